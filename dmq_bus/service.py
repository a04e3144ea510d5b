"""
A dmq-bus node as a Twisted service: the SIP stack, the bus, its peers,
listening on UDP and TCP (or TLS) at the server address.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any, cast

import attrs
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IListeningPort, IReactorTCP, IReactorTime, IReactorUDP
from twisted.logger import Logger

from dmq_bus.bus.dispatch import BusConfig, DMQBus
from dmq_bus.bus.notification import NotificationPeer
from dmq_bus.interfaces import IDMQPeer
from dmq_bus.sip.transaction import TimerPolicy, TransactionLayer, TransactionLimits
from dmq_bus.sip.transport import SIPTransportLayer, TransportLimits, listenUDP
from dmq_bus.sip.uri import stripBrackets

if TYPE_CHECKING:
    from dmq_bus.sip.tls import TLSContexts


@attrs.frozen
class NodeConfig:
    """
    Everything a node needs: the bus settings, the SIP layers' limits and,
    to use C{;transport=tls}, its TLS certificate, key and CA.
    """

    bus: BusConfig
    timers: TimerPolicy = TimerPolicy()
    transactionLimits: TransactionLimits = TransactionLimits()
    transportLimits: TransportLimits = TransportLimits()
    tls: TLSContexts | None = None


class NodeStack:
    """
    The layers of one node wired together, downward only: bus →
    transactions → transports. Nothing here listens on a socket.
    """

    def __init__(
        self, config: NodeConfig, clock: IReactorTime, tcpReactor: IReactorTCP | None
    ) -> None:
        server = config.bus.serverAddress
        self.config = config
        self.transport = SIPTransportLayer(
            None, clock, tcpReactor, limits=config.transportLimits, tls=config.tls
        )
        self.transactions = TransactionLayer(
            self.transport,
            None,
            clock,
            viaHost=stripBrackets(server.host),
            viaPort=server.defaultedPort,
            policy=config.timers,
            limits=config.transactionLimits,
        )
        self.transport.receiver = self.transactions
        self.bus = DMQBus(config.bus, self.transactions, clock)
        self.transactions.handler = self.bus
        self.notification = NotificationPeer(self.bus, clock)
        self.bus.registerPeer(self.notification)

    def registerPeer(self, peer: IDMQPeer) -> None:
        """Add an application peer."""
        self.bus.registerPeer(peer)

    def start(self) -> None:
        """Join the bus (the transports must already be able to send)."""
        self.notification.start()

    def leave(self) -> Deferred[None]:
        """Announce the leave and wait (bounded) for the answers."""
        return self.notification.leave()

    def stop(self) -> Deferred[Any]:
        """Stop timers (the peers' too, see L{IDMQPeer}) and close connections."""
        self.notification.stop()
        for peer in self.bus.peers():
            stop = getattr(peer, "stop", None)
            if peer is not self.notification and callable(stop):
                stop()
        return DeferredList([self.transactions.stop(), self.transport.stop()], consumeErrors=True)

    def stats(self) -> dict[str, int]:
        """
        Every counter of every layer and of every peer that has a
        C{counters} Counter, with gauges of the open state.
        """
        merged: Counter[str] = Counter()
        sources = [self.transport.counters, self.transactions.counters, self.bus.counters]
        health = getattr(self.notification, "health", None)
        if health is not None:
            sources.append(health.counters)
        for peer in self.bus.peers():
            counters = getattr(peer, "counters", None)
            if isinstance(counters, Counter) and all(counters is not c for c in sources):
                sources.append(counters)
        for counters in sources:
            merged.update(counters)
        gauges = {
            "transactions.client_open": self.transactions.openClientTransactions,
            "transactions.server_open": self.transactions.openServerTransactions,
            "nodes.total": len(self.bus.nodeList),
        }
        return dict(sorted(merged.items())) | gauges


class DMQService(MultiService):
    """
    A dmq-bus node: listens on UDP and TCP at the server address (UDP and
    TLS when it has C{;transport=tls}: one port cannot carry both TCP and
    TLS, and Kamailio takes a tls URI's port as its TLS port), joins the
    bus through the notification addresses, and on stop announces its leave
    before closing. Peers may be registered before or after start.

    @raise ValueError: the access policy is TLS-only
        (L{dmq_bus.bus.guard.AccessPolicy.tlsOnly}) but the server address
        is not C{;transport=tls} or there are no TLS settings.
    """

    log = Logger()

    def __init__(self, config: NodeConfig, reactor: Any = None) -> None:
        if config.bus.access.tlsOnly:
            if config.bus.serverAddress.transport != "tls":
                raise ValueError(
                    "a TLS-only node needs a server address with ;transport=tls, "
                    f"not {config.bus.serverAddress}"
                )
            if config.tls is None:
                raise ValueError("a TLS-only node needs TLS settings (NodeConfig.tls)")
        super().__init__()  # type: ignore[no-untyped-call]
        if reactor is None:
            from twisted.internet import reactor as globalReactor

            reactor = globalReactor
        self.reactor = reactor
        self.config = config
        self.stack = NodeStack(config, reactor, reactor)
        self._ports: list[IListeningPort] = []

    @property
    def bus(self) -> DMQBus:
        """The bus this service runs."""
        return self.stack.bus

    def startService(self) -> None:
        server = self.config.bus.serverAddress
        host = stripBrackets(server.host)
        port = server.defaultedPort
        udp = cast(IReactorUDP, self.reactor)
        tcp = cast(IReactorTCP, self.reactor)
        stream = server.transport == "tls"
        factory = (  # before listening: refuses tls without TLS settings
            self.stack.transport.tlsStreamFactory()
            if stream
            else self.stack.transport.streamFactory()
        )
        self._ports.append(  # one reused receive buffer on a posix reactor (see listenUDP)
            listenUDP(
                udp,
                port,
                self.stack.transport.datagramProtocol(),
                interface=host,
                maxPacketSize=self.config.transportLimits.maxDatagramSize,
            )
        )
        self._ports.append(tcp.listenTCP(port, cast(Any, factory), interface=host))
        super().startService()  # type: ignore[no-untyped-call]
        self.log.info(
            "dmq-bus node {node} listening on udp and {stream}{only}; seeds: {seeds}",
            node=str(server),
            stream="tls" if stream else "tcp",
            only=" (requests accepted over tls only)" if self.config.bus.access.tlsOnly else "",
            seeds=", ".join(str(s) for s in self.config.bus.notificationAddresses) or "none",
        )
        self.stack.start()

    def stopService(self) -> Deferred[None]:
        """Leave the bus (bounded wait), then stop listening and close everything."""
        super().stopService()  # type: ignore[no-untyped-call]
        d = self.stack.leave()

        def close(_: object) -> Deferred[Any]:
            ports = [p.stopListening() for p in self._ports]
            self._ports = []
            return DeferredList([*(p for p in ports if p is not None), self.stack.stop()])

        return d.addCallback(close).addCallback(lambda _: None)
