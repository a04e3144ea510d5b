"""
A dmq-bus node and real Kamailio 5.6.3 nodes in one DMQ bus on 127.0.0.1:
joining each other, seeing each other active (Kamailio's own
C{dmq.list_nodes} included), noticing crashes and leaves; over UDP and TCP.

Skipped, loudly, only where Kamailio is not installed.
"""

# Twisted's assert* methods carry no annotations: calling them is fine here.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import shutil
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from dmq_bus.bus.dispatch import BusConfig
from dmq_bus.service import DMQService, NodeConfig
from dmq_bus.sip.uri import SIPURI

from .kamailio import SKIP_REASON, KamailioNode, allocatePorts, kamailioAvailable, waitFor

log = Logger()


class _BusInterop:
    """The scenarios; subclasses choose the transport."""

    transport = "udp"
    timeout = 90
    skip = None if kamailioAvailable() else SKIP_REASON

    # supplied by TestCase
    addCleanup: Any
    assertEqual: Any
    assertNotIn: Any

    def setUp(self) -> None:
        self.base = tempfile.mkdtemp(prefix="dmqb-")
        self.addCleanup(shutil.rmtree, self.base, True)
        self.ports = allocatePorts(4)

    def address(self, port: int) -> str:
        suffix = ";transport=tcp" if self.transport == "tcp" else ""
        return f"sip:127.0.0.1:{port}{suffix}"

    def kamailio(self, port: int, seed: int | None = None, **kwargs: Any) -> KamailioNode:
        node = KamailioNode(port, seed, baseDir=self.base, transport=self.transport, **kwargs)
        self.addCleanup(node.stop)
        node.start()
        return node

    def dmqBus(self, port: int, seed: int | None = None, **busOptions: Any) -> DMQService:
        config = BusConfig(
            serverAddress=SIPURI.parse(self.address(port)),
            notificationAddresses=(SIPURI.parse(self.address(seed)),) if seed else (),
            **busOptions,
        )
        service = DMQService(NodeConfig(bus=config), reactor)
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        return service

    @staticmethod
    def kamailioSees(node: KamailioNode, port: int, status: str = "active") -> bool:
        return node.nodeStatuses().get(port) == status

    @staticmethod
    def weSee(service: DMQService, port: int) -> str | None:
        for node in service.bus.nodes():
            if node.uri.port == port:
                return node.status.word
        return None

    @inlineCallbacks
    def test_dmqBusJoinsKamailioBus(self) -> Any:
        """
        A dmq-bus node seeded with one node of a 2-node Kamailio bus: all
        three list each other active, in Kamailio's dmq.list_nodes too.
        """
        k1, k2, ours = self.ports[:3]
        a = self.kamailio(k1)
        b = self.kamailio(k2, k1)
        yield waitFor(lambda: self.kamailioSees(a, k2) and self.kamailioSees(b, k1), 15)
        start = reactor.seconds()
        service = self.dmqBus(ours, k1)
        yield waitFor(
            lambda: (
                self.kamailioSees(a, ours)
                and self.kamailioSees(b, ours)
                and self.weSee(service, k1) == "active"
                and self.weSee(service, k2) == "active"
            ),
            15,
        )
        log.info(
            "interop join ({transport}): converged in {elapsed:.3f} s",
            transport=self.transport,
            elapsed=reactor.seconds() - start,
        )
        listed = {n["port"]: n for n in a.listNodes()}
        self.assertEqual(listed[ours]["status"], "active")
        self.assertEqual(listed[ours]["proto"], "tcp" if self.transport == "tcp" else "*")
        self.assertEqual(listed[ours]["local"], False)
        self.assertEqual(len(service.bus.nodes()), 3)

    @inlineCallbacks
    def test_kamailioJoinsDmqBusSeed(self) -> Any:
        """A Kamailio node seeded with a dmq-bus node: both list each other active."""
        ours, k = self.ports[:2]
        service = self.dmqBus(ours)
        start = reactor.seconds()
        node = self.kamailio(k, ours)
        yield waitFor(
            lambda: self.kamailioSees(node, ours) and self.weSee(service, k) == "active", 15
        )
        log.info(
            "interop kamailio-joins-us ({transport}): {elapsed:.3f} s",
            transport=self.transport,
            elapsed=reactor.seconds() - start,
        )
        self.assertEqual(len(node.listNodes()), 2)

    @inlineCallbacks
    def test_killedKamailioMarkedThenRemoved(self) -> Any:
        """
        A Kamailio node killed with SIGKILL is marked disabled by the dmq-bus
        node, then removed from its list.
        """
        k1, k2, ours = self.ports[:3]
        a = self.kamailio(k1)
        b = self.kamailio(k2, k1)
        service = self.dmqBus(ours, k1, pingInterval=1.0, pingTimeout=1.0)
        yield waitFor(
            lambda: self.weSee(service, k2) == "active" and self.kamailioSees(b, ours), 15
        )
        b.kill()
        killed = reactor.seconds()
        yield waitFor(lambda: self.weSee(service, k2) == "disabled", 10)
        disabledAfter = reactor.seconds() - killed
        yield waitFor(lambda: self.weSee(service, k2) is None, 10)
        log.info(
            "interop crash ({transport}): disabled after {disabled:.2f} s, removed after {removed:.2f} s",
            transport=self.transport,
            disabled=disabledAfter,
            removed=reactor.seconds() - killed,
        )
        self.assertEqual(self.weSee(service, k1), "active")
        self.assertEqual(a.nodeStatuses().get(ours), "active")

    @inlineCallbacks
    def test_stoppedDmqBusMarkedByKamailio(self) -> Any:
        """
        A dmq-bus node that stops announces its leave: Kamailio marks it
        disabled at once (no waiting for ping timeouts), and later removes it.
        """
        k1, ours = self.ports[:2]
        a = self.kamailio(k1, frTimer=2000)
        service = self.dmqBus(ours, k1)
        yield waitFor(lambda: self.kamailioSees(a, ours), 15)
        stopping = reactor.seconds()
        yield service.stopService()
        self.assertEqual(a.nodeStatuses().get(ours), "disabled")
        log.info(
            "interop leave ({transport}): stopped and marked in {elapsed:.3f} s",
            transport=self.transport,
            elapsed=reactor.seconds() - stopping,
        )
        yield waitFor(lambda: ours not in a.nodeStatuses(), 20)


class UDPInteropTests(_BusInterop, TestCase):
    """dmq-bus and Kamailio 5.6.3 over UDP."""

    transport = "udp"


class TCPInteropTests(_BusInterop, TestCase):
    """dmq-bus and Kamailio 5.6.3 over TCP (every node advertises ;transport=tcp)."""

    transport = "tcp"
