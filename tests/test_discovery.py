"""
DNS discovery of seeds (Kamailio's multi_notify), against a real
twisted.names DNS server on 127.0.0.1 that each test starts and fills.
"""

# Twisted's assert* methods carry no annotations: calling them is fine here.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any, cast

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorUDP
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.names import client, common, dns, server
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from dmq_bus import tap
from dmq_bus.bus.discovery import SeedDiscovery, resolveSeeds, systemNameServers
from dmq_bus.service import DMQService
from dmq_bus.sip.uri import SIPURI
from dmq_bus.testing import MemoryNetwork

from .test_logs import Collector

NAME = "dmq.test"


class ServerTrouble(Exception):
    """What the test DNS server fails with when told to (answered SERVFAIL)."""


class Zone(common.ResolverBase):
    """
    A mutable authority: C{records[(name, type)]} are the answers; a name
    with no records at all does not exist (NXDOMAIN); C{failing} makes
    every query fail (SERVFAIL).
    """

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[tuple[str, int], list[Any]] = {}
        self.failing = False

    def add(self, name: str, payload: Any) -> None:
        self.records.setdefault((name, payload.TYPE), []).append(payload)

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> Deferred[Any]:
        if self.failing:
            return defer.fail(ServerTrouble())
        text = name.decode("ascii").lower()
        if not any(n == text for n, _ in self.records):
            return defer.fail(dns.DomainError(name))
        answers = [
            dns.RRHeader(name=name, type=type, ttl=5, payload=payload, auth=True)
            for payload in self.records.get((text, type), [])
        ]
        return defer.succeed((answers, [], []))


def srv(target: str, port: int, priority: int = 10, weight: int = 10) -> dns.Record_SRV:
    return dns.Record_SRV(priority, weight, port, target)


class DNSTestCase(TestCase):
    timeout = 20

    def setUp(self) -> None:
        self.zone = Zone()
        factory = server.DNSServerFactory(authorities=[self.zone])
        port = cast(IReactorUDP, reactor).listenUDP(
            0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1", maxPacketSize=8192
        )
        self.addCleanup(port.stopListening)
        self.resolver = client.Resolver(
            servers=[("127.0.0.1", cast(IPv4Address, port.getHost()).port)], reactor=reactor
        )

    def resolve(self, uri: str) -> Deferred[list[str]]:
        d = resolveSeeds(self.resolver, SIPURI.parse(uri), timeout=(2.0,))
        return d.addCallback(lambda seeds: [str(s) for s in seeds])


class ResolutionTests(DNSTestCase):
    """One resolution: SRV, then the targets' and the name's own addresses."""

    def setUp(self) -> None:
        super().setUp()
        zone = self.zone
        zone.add(NAME, srv("b.dmq.test", 5060, priority=20))
        zone.add(NAME, srv("a.dmq.test", 5060, priority=10))
        zone.add(NAME, srv("other.dmq.test", 5070, priority=10))
        zone.add("a.dmq.test", dns.Record_A("127.0.0.1"))
        zone.add("a.dmq.test", dns.Record_AAAA("fd00::1"))
        zone.add("b.dmq.test", dns.Record_A("127.0.0.2"))
        zone.add("other.dmq.test", dns.Record_A("127.0.0.7"))
        zone.add(NAME, dns.Record_A("127.0.0.9"))
        zone.add(NAME, dns.Record_A("127.0.0.1"))
        zone.add(NAME, dns.Record_AAAA("fd00::9"))

    @inlineCallbacks
    def test_srvPortFiltered(self) -> Any:
        """
        With a port in the URI only SRV records of that port count; targets
        come by priority, each target's A then AAAA, then the name's own A
        and AAAA; an address found twice is one seed; parameters are kept.
        """
        seeds = yield self.resolve(f"sip:{NAME}:5060;transport=tcp")
        self.assertEqual(seeds, [
            "sip:127.0.0.1:5060;transport=tcp",
            "sip:[fd00::1]:5060;transport=tcp",
            "sip:127.0.0.2:5060;transport=tcp",
            "sip:127.0.0.9:5060;transport=tcp",
            "sip:[fd00::9]:5060;transport=tcp",
        ])  # fmt: skip

    @inlineCallbacks
    def test_noPortTakesSrvPorts(self) -> Any:
        """Without a port every SRV record counts, with its own port; the name's addresses get 5060."""
        seeds = yield self.resolve(f"sip:{NAME}")
        self.assertEqual(seeds, [
            "sip:127.0.0.1:5060",
            "sip:[fd00::1]:5060",
            "sip:127.0.0.7:5070",
            "sip:127.0.0.2:5060",
            "sip:127.0.0.9:5060",
            "sip:[fd00::9]:5060",
        ])  # fmt: skip

    @inlineCallbacks
    def test_addressRecordsOnly(self) -> Any:
        """A name with A records but no SRV (a Kubernetes headless service) gives its addresses."""
        self.zone.add("pods.test", dns.Record_A("127.1.0.1"))
        self.zone.add("pods.test", dns.Record_A("127.1.0.2"))
        seeds = yield self.resolve("sip:pods.test:5060")
        self.assertEqual(seeds, ["sip:127.1.0.1:5060", "sip:127.1.0.2:5060"])

    @inlineCallbacks
    def test_missingName(self) -> Any:
        """A name that does not exist gives no seeds (it is not an error)."""
        seeds = yield self.resolve("sip:nowhere.test:5060")
        self.assertEqual(seeds, [])


class Seeds:
    """Receives the seed sets a discovery hands over."""

    def __init__(self) -> None:
        self.sets: list[list[str]] = []

    def __call__(self, seeds: Sequence[SIPURI]) -> None:
        self.sets.append([str(s) for s in seeds])


class DiscoveryTests(DNSTestCase):
    """SeedDiscovery: re-resolved every interval on its clock, failures absorbed."""

    def discovery(
        self, uri: str, **kwargs: Any
    ) -> tuple[SeedDiscovery, Seeds, list[Deferred[None]]]:
        seeds = Seeds()
        clock = Clock()
        discovery = SeedDiscovery(
            SIPURI.parse(uri), self.resolver, clock, 5.0, seeds, Counter(), timeout=(2.0,), **kwargs
        )
        refreshes: list[Deferred[None]] = []
        refresh = discovery.refresh

        def tracked() -> Deferred[None]:
            d = refresh()
            refreshes.append(d)
            return d

        discovery.refresh = tracked  # type: ignore[method-assign]
        self.clock = clock
        discovery.startService()
        self.addCleanup(discovery.stopService)
        return discovery, seeds, refreshes

    @inlineCallbacks
    def test_cap(self) -> Any:
        """At most 30 seeds are kept from one resolution; the cut is counted."""
        for i in range(40):
            self.zone.add("many.test", dns.Record_A(f"127.2.0.{i + 1}"))
        discovery, seeds, refreshes = self.discovery("sip:many.test:5060")
        yield refreshes[-1]
        (found,) = seeds.sets
        self.assertEqual(len(found), 30)
        self.assertEqual(found[:2], ["sip:127.2.0.1:5060", "sip:127.2.0.2:5060"])
        self.assertEqual(discovery.counters["discovery.truncated"], 1)

    @inlineCallbacks
    def test_reresolution(self) -> Any:
        """
        Every interval the name is resolved again: a new address becomes a
        seed, a vanished one stops being a seed; an unchanged answer hands
        nothing over.
        """
        self.zone.add("pods.test", dns.Record_A("127.1.0.1"))
        self.zone.add("pods.test", dns.Record_A("127.1.0.2"))
        discovery, seeds, refreshes = self.discovery("sip:pods.test:5060")
        yield refreshes[-1]
        self.assertEqual(seeds.sets, [["sip:127.1.0.1:5060", "sip:127.1.0.2:5060"]])
        self.clock.advance(4.9)
        self.assertEqual(len(refreshes), 1)
        self.clock.advance(0.1)
        yield refreshes[-1]
        self.assertEqual(len(seeds.sets), 1)
        self.zone.records[("pods.test", dns.A)] = [
            dns.Record_A("127.1.0.2"),
            dns.Record_A("127.1.0.3"),
        ]
        self.clock.advance(5.0)
        yield refreshes[-1]
        self.assertEqual(seeds.sets[-1], ["sip:127.1.0.2:5060", "sip:127.1.0.3:5060"])
        self.assertEqual(
            (
                discovery.counters["discovery.seeds_added"],
                discovery.counters["discovery.seeds_dropped"],
            ),
            (3, 1),
        )
        self.assertEqual(discovery.counters["discovery.resolutions"], 3)

    @inlineCallbacks
    def test_failureKeepsSeeds(self) -> Any:
        """
        When the DNS server fails, the seeds found before stay; the failure
        is counted and logged once as a warning, and recovery is logged too.
        """
        collector = Collector()
        events = collector.events
        globalLogPublisher.addObserver(collector)
        self.addCleanup(globalLogPublisher.removeObserver, collector)
        self.zone.add("pods.test", dns.Record_A("127.1.0.1"))
        discovery, seeds, refreshes = self.discovery("sip:pods.test:5060")
        yield refreshes[-1]
        self.zone.failing = True
        for _ in range(2):
            self.clock.advance(5.0)
            yield refreshes[-1]
        self.flushLoggedErrors(ServerTrouble)  # the test server logs why it answered SERVFAIL
        self.assertEqual(seeds.sets, [["sip:127.1.0.1:5060"]])
        self.assertEqual([str(s) for s in discovery.seeds], ["sip:127.1.0.1:5060"])
        self.assertEqual(discovery.counters["discovery.failures"], 2)
        failed = [e for e in events if "failed" in (e.get("log_format") or "")]
        self.assertEqual([e["log_level"] for e in failed], [LogLevel.warn, LogLevel.debug])
        self.assertEqual((failed[0]["name"], failed[0]["seeds"]), ("pods.test", 1))
        self.assertIn("DNSServerError", failed[0]["error"])
        self.zone.failing = False
        self.clock.advance(5.0)
        yield refreshes[-1]
        recovered = [e for e in events if e.get("log_format", "").endswith("answers again")]
        self.assertEqual(len(recovered), 1)

    @inlineCallbacks
    def test_stopped(self) -> Any:
        """Once stopped, no more resolutions are scheduled."""
        self.zone.add("pods.test", dns.Record_A("127.1.0.1"))
        discovery, _, refreshes = self.discovery("sip:pods.test:5060")
        yield refreshes[-1]
        discovery.stopService()
        self.clock.advance(60.0)
        self.assertEqual(len(refreshes), 1)


class SeedHookTests(SynchronousTestCase):
    """NotificationPeer.setSeeds: discovered seeds join the bus and stay while discovered."""

    def test_discoveredSeedJoins(self) -> None:
        """A node with no configured seed joins the bus as soon as a seed is discovered."""
        network = MemoryNetwork()
        a = network.addNode("127.0.0.1", pingInterval=1.0, pingTimeout=0.5)
        b = network.addNode("127.0.0.2", pingInterval=1.0, pingTimeout=0.5)
        b.stack.notification.setSeeds([SIPURI.parse(a.uri), SIPURI.parse(b.uri)])
        network.run(0.1)
        self.assertEqual(a.statuses()[b.uri], "active")
        self.assertEqual(b.statuses(), {a.uri: "active", b.uri: "active"})

    def test_seedStaysUntilDropped(self) -> None:
        """
        A discovered seed that stops answering goes back to pending and is
        never removed; once no longer discovered, failed pings remove it.
        """
        network = MemoryNetwork()
        a = network.addNode("127.0.0.1", pingInterval=1.0, pingTimeout=0.5)
        b = network.addNode("127.0.0.2", pingInterval=1.0, pingTimeout=0.5)
        b.stack.notification.setSeeds([SIPURI.parse(a.uri)])
        network.run(0.1)
        a.crash()
        network.run(10.0)
        self.assertEqual(b.statuses()[a.uri], "pending")
        b.stack.notification.setSeeds([])
        network.run(10.0)
        self.assertNotIn(a.uri, b.statuses())

    def test_seedsBeforeStart(self) -> None:
        """Seeds discovered before the node starts are joined through at start."""
        network = MemoryNetwork()
        a = network.addNode("127.0.0.1")
        b = network.addNode("127.0.0.2", start=False)
        b.stack.notification.setSeeds([SIPURI.parse(a.uri)])
        self.assertEqual(b.statuses(), {b.uri: "active"})
        b.stack.start()
        network.run(0.1)
        self.assertEqual(b.statuses()[a.uri], "active")

    def test_configuredSeedsKept(self) -> None:
        """Discovered seeds come on top of configured ones, which no discovery can drop."""
        network = MemoryNetwork()
        a = network.addNode("127.0.0.1", pingInterval=1.0, pingTimeout=0.5)
        b = network.addNode("127.0.0.2", seeds=[a], pingInterval=1.0, pingTimeout=0.5)
        network.run(0.1)
        b.stack.notification.setSeeds([])
        a.crash()
        network.run(10.0)
        self.assertEqual(b.statuses()[a.uri], "pending")


class OptionTests(SynchronousTestCase):
    """--multi-notify: names allowed only with it, and the first address only."""

    def parse(self, *args: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(list(args))
        return options

    def test_nameNeedsMultiNotify(self) -> None:
        """A DNS name as notification address without --multi-notify 1 is a clear usage error."""
        with self.assertRaises(usage.UsageError) as caught:
            self.parse("--notification-address", "sip:dmq.test:5060")
        self.assertIn("host must be an IP literal, not 'dmq.test'", str(caught.exception))
        self.assertIn("--multi-notify 1", str(caught.exception))

    def test_multiNotifyName(self) -> None:
        """With --multi-notify 1 a name is resolved instead of being a seed itself."""
        options = self.parse("--multi-notify", "1", "--notification-address", "sip:dmq.test:5060")
        self.assertEqual(options["busConfig"].notificationAddresses, ())
        self.assertEqual(str(options["discoveryAddress"]), "sip:dmq.test:5060")

    def test_multiNotifyIP(self) -> None:
        """With --multi-notify 1 an IP literal is used as it is, as Kamailio does."""
        options = self.parse("--multi-notify", "1", "--notification-address", "sip:127.0.0.1:5060")
        self.assertEqual(
            [str(u) for u in options["busConfig"].notificationAddresses], ["sip:127.0.0.1:5060"]
        )
        self.assertIsNone(options["discoveryAddress"])

    def test_multiNotifyOneAddress(self) -> None:
        """With --multi-notify 1 a second notification address is refused (Kamailio ignores it)."""
        with self.assertRaises(usage.UsageError) as caught:
            self.parse(
                "--multi-notify", "1",
                "--notification-address", "sip:dmq.test:5060",
                "--notification-address", "sip:127.0.0.1:5060",
            )  # fmt: skip
        self.assertIn("only one notification address", str(caught.exception))
        self.assertRaises(usage.UsageError, self.parse, "--multi-notify", "yes")

    def test_makeServiceWiresDiscovery(self) -> None:
        """
        makeService gives the node a discovery, re-resolving every ping
        interval, whose seeds go to the node's membership and whose
        counters are the node's.
        """
        options = self.parse(
            "--multi-notify", "1",
            "--notification-address", "sip:dmq.test:5060",
            "--ping-interval", "3",
            "--control", "none",
        )  # fmt: skip
        service = tap.makeService(options)
        assert isinstance(service, DMQService)
        (discovery,) = [s for s in service if isinstance(s, SeedDiscovery)]
        self.assertEqual((discovery.dnsName, discovery.interval), ("dmq.test", 3.0))
        self.assertIs(discovery.counters, service.bus.counters)
        self.assertEqual(discovery.onSeeds, service.stack.notification.setSeeds)

    def test_systemNameServers(self) -> None:
        """The name servers come from resolv.conf; none there means 127.0.0.1, as libc does."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("search x.test\nnameserver 127.0.0.53\nnameserver 127.0.0.54\n")
        self.assertEqual(systemNameServers(path), [("127.0.0.53", 53), ("127.0.0.54", 53)])
        self.assertEqual(systemNameServers("/nonexistent"), [("127.0.0.1", 53)])
