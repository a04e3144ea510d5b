"""
An in-memory network for testing buses: N dmq-bus nodes on one
L{twisted.internet.task.Clock}, with loss, delay, duplication and partition
knobs. The real protocol, transaction and bus code runs; only the UDP
socket is replaced. Public: use it in your own peers' tests.

    network = MemoryNetwork()
    seed = network.addNode("127.0.0.1")
    other = network.addNode("127.0.0.2", seeds=[seed])
    network.run(1.0)
    assert len(other.bus.nodes()) == 2
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime, IUDPTransport
from twisted.internet.task import Clock
from zope.interface import implementer

from dmq_bus.bus.dispatch import BusConfig, DMQBus
from dmq_bus.interfaces import IDMQPeer
from dmq_bus.service import NodeConfig, NodeStack
from dmq_bus.sip.transport import SIPDatagramProtocol
from dmq_bus.sip.uri import SIPURI

Endpoint = tuple[str, int]


@implementer(IUDPTransport)
class MemoryDatagramTransport:
    """The UDP socket of one in-memory node: writes go to the network."""

    def __init__(self, network: MemoryNetwork, endpoint: Endpoint) -> None:
        self.network = network
        self.endpoint = endpoint
        self.sent = 0

    def write(self, packet: bytes, addr: Any = None) -> None:
        self.sent += 1
        self.network.deliver(self.endpoint, (addr[0], int(addr[1])), packet)

    def getHost(self) -> Any:
        from twisted.internet.address import IPv4Address

        return IPv4Address("UDP", *self.endpoint)

    def connect(self, host: str, port: int) -> None:
        raise NotImplementedError("connected UDP is not used")

    def stopListening(self) -> None:
        self.network.detach(self.endpoint)

    def setBroadcastAllowed(self, enabled: bool) -> None:
        pass

    def getBroadcastAllowed(self) -> bool:
        return False


@attrs.define
class MemoryNode:
    """One node of a L{MemoryNetwork}."""

    network: MemoryNetwork
    stack: NodeStack
    endpoint: Endpoint
    protocol: SIPDatagramProtocol
    up: bool = True

    @property
    def bus(self) -> DMQBus:
        """The node's bus."""
        return self.stack.bus

    @property
    def uri(self) -> str:
        """The node's server address."""
        return str(self.stack.config.bus.serverAddress)

    def registerPeer(self, peer: IDMQPeer) -> None:
        """Add an application peer to this node."""
        self.stack.registerPeer(peer)

    def statuses(self) -> dict[str, str]:
        """C{{uri: status word}} of every node this node lists (itself too)."""
        return {str(n.uri): n.status.word for n in self.bus.nodes()}

    def stop(self) -> Deferred[None]:
        """Leave gracefully (announce, wait bounded), then go off the network."""

        def off(_: object) -> None:
            self.stack.stop()
            self.network.detach(self.endpoint)
            self.up = False

        return self.stack.leave().addCallback(off)

    def crash(self) -> None:
        """Vanish at once: no announcement, no answers, timers stopped."""
        self.network.detach(self.endpoint)
        self.stack.stop()
        self.up = False


class MemoryNetwork:
    """
    Datagrams between in-memory nodes, each delivered after C{delay}
    seconds (plus up to C{jitter}), lost with probability C{loss},
    duplicated with probability C{duplicate}, never across a partition.
    Randomness comes from C{seed}: runs are repeatable.
    """

    def __init__(
        self,
        clock: Clock | None = None,
        *,
        loss: float = 0.0,
        delay: float = 0.0005,
        jitter: float = 0.0,
        duplicate: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.clock = clock if clock is not None else Clock()
        self.loss = loss
        self.delay = delay
        self.jitter = jitter
        self.duplicate = duplicate
        self.random = random.Random(seed)
        self._protocols: dict[Endpoint, SIPDatagramProtocol] = {}
        self._group: dict[Endpoint, int] = {}
        self.nodes: list[MemoryNode] = []
        self.delivered = 0
        self.dropped = 0

    def addNode(
        self,
        host: str,
        port: int = 5060,
        *,
        seeds: Iterable[MemoryNode | str] = (),
        start: bool = True,
        **busOptions: Any,
    ) -> MemoryNode:
        """
        Add a node at C{sip:host:port} seeded with C{seeds} (nodes or URIs);
        C{busOptions} are L{BusConfig} fields (C{pingInterval=1.0}, ...).
        """
        seedURIs = tuple(SIPURI.parse(s.uri if isinstance(s, MemoryNode) else s) for s in seeds)
        config = NodeConfig(
            bus=BusConfig(
                serverAddress=SIPURI(host=host, port=port),
                notificationAddresses=seedURIs,
                **busOptions,
            )
        )
        clock: IReactorTime = self.clock
        stack = NodeStack(config, clock, None)
        endpoint = (host, port)
        protocol = stack.transport.datagramProtocol()
        protocol.makeConnection(MemoryDatagramTransport(self, endpoint))  # type: ignore[arg-type]
        self._protocols[endpoint] = protocol
        node = MemoryNode(self, stack, endpoint, protocol)
        self.nodes.append(node)
        if start:
            stack.start()
        return node

    def detach(self, endpoint: Endpoint) -> None:
        """Take an endpoint off the network (datagrams to it are lost)."""
        self._protocols.pop(endpoint, None)

    def partition(self, *groups: Iterable[MemoryNode]) -> None:
        """Split the network: only nodes of the same group reach each other."""
        self._group = {}
        for index, group in enumerate(groups):
            for node in group:
                self._group[node.endpoint] = index

    def heal(self) -> None:
        """Remove every partition."""
        self._group = {}

    def deliver(self, source: Endpoint, destination: Endpoint, packet: bytes) -> None:
        """Carry one datagram, applying the knobs."""
        if self._group and self._group.get(source, -1) != self._group.get(destination, -2):
            self.dropped += 1
            return
        copies = 2 if self.duplicate and self.random.random() < self.duplicate else 1
        for _ in range(copies):
            if self.loss and self.random.random() < self.loss:
                self.dropped += 1
                continue
            wait = self.delay + (self.random.random() * self.jitter if self.jitter else 0.0)
            self.clock.callLater(wait, self._arrive, source, destination, packet)

    def _arrive(self, source: Endpoint, destination: Endpoint, packet: bytes) -> None:
        protocol = self._protocols.get(destination)
        if protocol is None:
            self.dropped += 1
            return
        self.delivered += 1
        protocol.datagramReceived(packet, source)

    def run(self, seconds: float) -> None:
        """Advance the clock by C{seconds}, firing every timer and delivery on the way."""
        end = self.clock.seconds() + seconds
        while self.clock.calls and self.clock.calls[0].getTime() <= end:
            self.clock.advance(max(0.0, self.clock.calls[0].getTime() - self.clock.seconds()))
        self.clock.advance(end - self.clock.seconds())
