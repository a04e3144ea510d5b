"""
dmq-bus nodes and real Kamailio 5.6.3 nodes with DMQ over TLS (Kamailio's
tls module, C{kamailio-tls.cfg}) on 127.0.0.1: every node advertises
C{;transport=tls} and has a certificate of one throw-away CA, and every
node, Kamailio or ours, requires and verifies the peer's certificate in
both roles.

The bus and htable scenarios of C{test_interop_bus} and
C{test_interop_htable} run here again over TLS. On top: certificate
verification both ways, and two facts the documentation relies on (Kamailio
checks only the certificate chain; Kamailio's DMQ ignores the C{sips:}
scheme).

Skipped, loudly, only where Kamailio or its tls module is not installed.
"""

# Twisted's assert* methods carry no annotations: calling them is fine here.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import shutil
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from dmq_bus.bus.dispatch import BusConfig
from dmq_bus.bus.guard import AccessPolicy
from dmq_bus.bus.values import DeliveryFailed, Node
from dmq_bus.peers.htable import HTablePeer, encodeSet
from dmq_bus.service import DMQService, NodeConfig
from dmq_bus.sip.tls import TLSContexts
from dmq_bus.sip.uri import SIPURI

from ..certificates import Authority, NodeFiles
from . import test_interop_bus, test_interop_htable
from .kamailio import (
    SKIP_REASON,
    TLS_SKIP_REASON,
    KamailioNode,
    allocatePorts,
    bothActive,
    kamailioAvailable,
    kamailioTLSAvailable,
    tlsConfigIncluding,
    waitFor,
)


def tlsAddress(port: int) -> SIPURI:
    """C{sip:127.0.0.1:PORT;transport=tls}."""
    return SIPURI.parse(f"sip:127.0.0.1:{port};transport=tls")


def listedAs(service: DMQService, port: int) -> tuple[str, str] | None:
    """(transport, status) of the node on C{port} in C{service}'s list, or None."""
    for node in service.bus.nodes():
        if node.uri.port == port:
            return node.transport, node.status.word
    return None


class _TLSBus:
    """
    Kamailio and dmq-bus nodes over TLS, with certificates of one CA
    (C{self.authority}) written to C{self.base}.
    """

    timeout = 90
    skip = None if kamailioTLSAvailable() else TLS_SKIP_REASON

    # supplied by the test case
    base: str
    addCleanup: Any

    def setUpAuthority(self) -> None:
        self.authority = Authority.create("bus CA")

    def files(self, label: str, host: str = "127.0.0.1") -> NodeFiles:
        """A certificate of the bus CA for C{host}, its key and the bus CA."""
        return self.authority.issue(self.base, host, label)

    def stranger(self, label: str) -> NodeFiles:
        """A certificate of another CA, with the bus CA as trusted bundle."""
        other = Authority.create("other CA").issue(self.base, "127.0.0.1", label)
        return NodeFiles(other.certificate, other.key, self.files(f"{label}-trust").ca)

    def kamailioTLS(
        self,
        port: int,
        seed: int | None = None,
        files: NodeFiles | None = None,
        **kwargs: Any,
    ) -> KamailioNode:
        """A started Kamailio TLS node (stopped in cleanup)."""
        node = KamailioNode(
            port,
            seed,
            baseDir=self.base,
            transport="tls",
            tls=files or self.files(f"kamailio-{port}"),
            **kwargs,
        )
        self.addCleanup(node.stop)
        node.start()
        return node

    def tlsService(
        self, port: int, seed: int | None = None, files: NodeFiles | None = None, **busOptions: Any
    ) -> DMQService:
        """A dmq-bus TLS node, not started yet."""
        files = files or self.files(f"dmq-bus-{port}")
        config = BusConfig(
            serverAddress=tlsAddress(port),
            notificationAddresses=(tlsAddress(seed),) if seed else (),
            **busOptions,
        )
        tls = TLSContexts.fromFiles(files.certificate, files.key, files.ca)
        return DMQService(NodeConfig(bus=config, tls=tls), reactor)

    def started(self, service: DMQService) -> DMQService:
        """C{service}, started (and stopped in cleanup)."""
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        return service


class TLSBusInteropTests(_TLSBus, test_interop_bus._BusInterop, TestCase):
    """The join, crash and leave scenarios of C{test_interop_bus} over TLS."""

    transport = "tls"

    def setUp(self) -> None:
        super().setUp()
        self.setUpAuthority()

    def kamailio(self, port: int, seed: int | None = None, **kwargs: Any) -> KamailioNode:
        return self.kamailioTLS(port, seed, **kwargs)

    def dmqBus(self, port: int, seed: int | None = None, **busOptions: Any) -> DMQService:
        return self.started(self.tlsService(port, seed, **busOptions))

    @inlineCallbacks
    def test_dmqBusJoinsKamailioBus(self) -> Any:
        """
        (In place of the shared scenario, which expects Kamailio's C{proto}
        column to read C{*} or C{tcp}.) A dmq-bus node joins a Kamailio node
        over TLS, then a second Kamailio node joins through the dmq-bus
        node: all three list each other active, each with
        C{;transport=tls} (Kamailio: C{proto tls}); nothing went over UDP.
        """
        k1, ours, k2 = self.ports[:3]
        first = self.kamailio(k1)
        service = self.dmqBus(ours, k1)
        yield waitFor(lambda: bothActive(service, first), 15)
        second = self.kamailio(k2, ours)
        yield waitFor(lambda: bothActive(service, second) and self.kamailioSees(first, k2), 15)
        for node in (first, second):
            listed = {(n["port"], n["proto"], n["status"]) for n in node.listNodes()}
            self.assertEqual(listed, {(p, "tls", "active") for p in (k1, ours, k2)})
        self.assertEqual(listedAs(service, k1), ("tls", "active"))
        self.assertEqual(listedAs(service, k2), ("tls", "active"))
        counters = service.stack.transport.counters
        self.assertEqual(counters["udp.received"] + counters["udp.sent"], 0)
        self.assertGreater(counters["tcp.received"], 0)
        for name in ("tls.handshake_failed", "tls.refused_by_peer", "tls.inbound_failed"):
            self.assertEqual(counters[name], 0, name)


class TLSHTableInteropTests(_TLSBus, test_interop_htable.HTableInteropTests):
    """
    The replicated-table scenarios of C{test_interop_htable} over TLS:
    writes both ways, expiry, sync on join in both directions (3,000 keys
    in chunks small enough for Kamailio's TCP reader), every kind of body.
    """

    def setUp(self) -> None:
        super().setUp()
        self.setUpAuthority()
        self.tlsConfig = tlsConfigIncluding(self.config, self.base)

    def kamailio(self, port: int, seed: int | None = None) -> KamailioNode:
        return self.kamailioTLS(port, seed, config=self.tlsConfig)

    access = AccessPolicy()
    """The dmq-bus nodes' access policy."""

    def dmqBus(self, port: int, seed: int | None = None) -> tuple[DMQService, HTablePeer]:
        service = self.tlsService(port, seed, access=self.access)
        peer = HTablePeer(service.bus, self.clock, test_interop_htable.SPECS)
        service.bus.registerPeer(peer)
        self.started(service)
        self.addCleanup(peer.stop)
        return service, peer


class TLSOnlyHTableInteropTests(TLSHTableInteropTests):
    """
    The same scenarios with C{--tls-only} on the dmq-bus nodes: everything
    Kamailio's tls module sends arrives over TLS, so nothing is refused.
    """

    access = AccessPolicy(tlsOnly=True)

    def dmqBus(self, port: int, seed: int | None = None) -> tuple[DMQService, HTablePeer]:
        service, peer = super().dmqBus(port, seed)
        self.addCleanup(self.nothingRefused, service)
        return service, peer

    def nothingRefused(self, service: DMQService) -> None:
        refused = {k: v for k, v in service.bus.counters.items() if k.startswith("in.forbidden")}
        self.assertEqual({k: v for k, v in refused.items() if v}, {})


class TLSVerificationTests(_TLSBus, TestCase):
    """Each side refuses a peer whose certificate its CA bundle does not verify."""

    def setUp(self) -> None:
        self.base = tempfile.mkdtemp(prefix="dmqt-")
        self.addCleanup(shutil.rmtree, self.base, True)
        self.ports = allocatePorts(2)
        self.setUpAuthority()

    @inlineCallbacks
    def test_kamailioRefusesUntrustedDmqBus(self) -> Any:
        """
        A dmq-bus node whose certificate comes from a CA Kamailio does not
        trust (while it trusts Kamailio's) is refused by Kamailio after the
        TLS 1.3 handshake: its join and a direct htable write fail at once
        (L{DeliveryFailed}, counted as C{tls.refused_by_peer}), not after
        the 32 s request timeout; Kamailio never lists it and the write
        does not land.
        """
        k, ours = self.ports
        node = self.kamailioTLS(k)
        service = self.started(self.tlsService(ours, k, files=self.stranger("stranger")))
        counters = service.stack.transport.counters
        yield waitFor(lambda: counters["tls.refused_by_peer"] >= 1, 15)
        refused = counters["tls.refused_by_peer"]
        target = Node.fromURI(tlsAddress(k))
        started = reactor.seconds()
        failure = yield self.assertFailure(
            service.bus.send(
                "htable", target, encodeSet("kv", "intruder", "x"), "application/json"
            ),
            DeliveryFailed,
        )
        self.assertLess(reactor.seconds() - started, 5.0)
        self.assertEqual(failure.code, 408)
        self.assertEqual(counters["tls.refused_by_peer"], refused + 1)
        self.assertEqual(service.stack.transactions.counters["client.timeouts"], 0)
        self.assertIsNone(node.htGet("intruder"))
        self.assertEqual(node.nodeStatuses(), {k: "active"})
        self.assertIn("certificate verify failed", node.log())
        self.assertEqual(listedAs(service, k), ("tls", "pending"))

    @inlineCallbacks
    def test_dmqBusRefusesUntrustedKamailio(self) -> Any:
        """
        A Kamailio node whose certificate comes from a CA our bundle does
        not trust (while it trusts ours) cannot join through the dmq-bus
        node: each of its connections fails our handshake (counted as
        C{tls.inbound_failed}) and it never appears in our list. Our own
        request to it fails at once, as we do not verify its certificate
        (C{tls.handshake_failed}).
        """
        ours, k = self.ports
        service = self.started(self.tlsService(ours))
        counters = service.stack.transport.counters
        node = self.kamailioTLS(k, ours, files=self.stranger("kamailio-stranger"))
        yield waitFor(lambda: counters["tls.inbound_failed"] >= 1, 15)
        target = Node.fromURI(tlsAddress(k))
        started = reactor.seconds()
        yield self.assertFailure(
            service.bus.send("htable", target, encodeSet("kv", "k", "v"), "application/json"),
            DeliveryFailed,
        )
        self.assertLess(reactor.seconds() - started, 5.0)
        self.assertEqual(counters["tls.handshake_failed"], 1)
        self.assertEqual(counters["tcp.received"], 0)
        self.assertIsNone(listedAs(service, k))
        self.assertNotEqual(node.nodeStatuses().get(ours), "active")

    @inlineCallbacks
    def test_kamailioChecksOnlyTheChain(self) -> Any:
        """
        Kamailio 5.6.3 checks that a certificate chains to its ca_list, not
        which address it names: it accepts a dmq-bus node whose certificate
        (of the bus CA) is for 127.0.0.2 while the node is 127.0.0.1. (A
        dmq-bus node connecting to it refuses it: test_tls's
        C{test_wrongAddressRefused}.)
        """
        k, ours = self.ports
        node = self.kamailioTLS(k)
        elsewhere = self.files("elsewhere", host="127.0.0.2")
        service = self.started(self.tlsService(ours, k, files=elsewhere))
        yield waitFor(lambda: bothActive(service, node), 15)
        self.assertEqual(service.stack.transport.counters["tls.refused_by_peer"], 0)


class SipsSchemeTests(TestCase):
    """What Kamailio 5.6.3's DMQ does with C{sips:} addresses."""

    timeout = 60
    skip = None if kamailioAvailable() else SKIP_REASON

    @inlineCallbacks
    def test_sipsIsPlainUDP(self) -> Any:
        """
        A Kamailio node whose dmq server_address and notification_address
        are written C{sips:} (no transport) joins a dmq-bus node over UDP,
        in clear, naming itself C{sip:}: the scheme is ignored, only
        C{;transport=tls} selects TLS. This is why dmq-bus refuses
        C{sips:} addresses rather than reading them as TLS.
        """
        base = tempfile.mkdtemp(prefix="dmqs-")
        self.addCleanup(shutil.rmtree, base, True)
        ours, k = allocatePorts(2)
        config = BusConfig(serverAddress=SIPURI.parse(f"sip:127.0.0.1:{ours}"))
        service = DMQService(NodeConfig(bus=config), reactor)
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        node = KamailioNode(k, ours, baseDir=base)
        node.serverAddress = f"sips:127.0.0.1:{k}"
        node.seedAddress = f"sips:127.0.0.1:{ours}"
        self.addCleanup(node.stop)
        node.start()
        yield waitFor(lambda: bothActive(service, node), 15)
        [kamailio] = [n for n in service.bus.nodes() if n.uri.port == k]
        self.assertEqual(str(kamailio.uri), f"sip:127.0.0.1:{k}")
        self.assertEqual(kamailio.transport, "udp")
        self.assertGreater(service.stack.transport.counters["udp.received"], 0)
        self.assertEqual(service.stack.transport.counters["tcp.connections_opened"], 0)
        self.assertEqual({n["port"]: n["proto"] for n in node.listNodes()}, {k: "*", ours: "*"})
