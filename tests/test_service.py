"""
The node as a Twisted service and as C{twistd dmq}: options, plugin
discovery, and real nodes on 127.0.0.1 sockets joining and leaving.
"""

# Twisted's assert* methods carry no annotations: calling them is fine here.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

from typing import Any, cast

from twisted.application.service import IService, IServiceMaker
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from dmq_bus import tap
from dmq_bus.bus.dispatch import BusConfig
from dmq_bus.control import ControlService
from dmq_bus.interfaces import IHashTables
from dmq_bus.peers.echo import EchoPeer
from dmq_bus.service import DMQService, NodeConfig
from dmq_bus.sip.uri import SIPURI

from .interop.kamailio import allocatePorts, waitFor


def parse(*args: str) -> tap.Options:
    options = tap.Options()
    options.parseOptions(list(args))
    return options


class OptionsTests(SynchronousTestCase):
    """C{twistd dmq} options."""

    def test_noFlags(self) -> None:
        """With no flags: a single-node bus on sip:127.0.0.1:5060, Kamailio's defaults."""
        config: BusConfig = parse()["busConfig"]
        self.assertEqual(str(config.serverAddress), "sip:127.0.0.1:5060")
        self.assertEqual(config.notificationAddresses, ())
        self.assertEqual(config.channel, "notification_peer")

    def test_allFlags(self) -> None:
        """Every option reaches the configuration."""
        options = parse(
            "--server-address", "sip:127.0.0.2:5070",
            "--notification-address", "sip:127.0.0.1:5060",
            "--notification-address", "sip:127.0.0.3:5060",
            "--notification-channel", "peers",
            "--ping-interval", "2",
            "--ping-timeout", "1.5",
            "--request-timeout", "10",
            "--leave-timeout", "1",
            "--t1", "0.25",
            "--max-nodes", "50",
            "--user-agent", "",
            "--peer", "echo=probe",
        )  # fmt: skip
        config: BusConfig = options["busConfig"]
        self.assertEqual(str(config.serverAddress), "sip:127.0.0.2:5070")
        self.assertEqual([str(u) for u in config.notificationAddresses], [
            "sip:127.0.0.1:5060", "sip:127.0.0.3:5060"
        ])  # fmt: skip
        self.assertEqual(
            (config.channel, config.pingInterval, config.pingTimeout, config.requestTimeout),
            ("peers", 2.0, 1.5, 10.0),
        )
        self.assertEqual((config.leaveTimeout, config.maxNodes, config.userAgent), (1.0, 50, None))
        self.assertEqual(options["timers"].t1, 0.25)
        ((factory, peerOptions),) = options["peerSpecs"]
        self.assertEqual((factory.name, peerOptions), ("echo", "probe"))

    def test_badFlags(self) -> None:
        """Bad values get a usage error naming the option, not a traceback."""
        cases = [
            (["--server-address", "http://x"], "--server-address"),
            (["--server-address", "sip:example.com:5060"], "IP literal"),
            (["--server-address", "sip:127.0.0.1"], "explicit port"),
            (["--server-address", "sip:127.0.0.1:5060;transport=sctp"], "not supported"),
            (["--notification-address", "nonsense"], "--notification-address"),
            (["--ping-interval", "0"], "ping-interval"),
            (["--ping-interval", "abc"], "ping-interval"),
            (["--peer", "nosuchpeer"], "no peer named"),
            (["--notification-channel", "a b"], "--notification-channel"),
        ]
        for args, words in cases:
            with self.assertRaises(usage.UsageError, msg=args) as caught:
                parse(*args)
            self.assertIn(words, str(caught.exception), args)

    def test_makeService(self) -> None:
        """
        makeService gives an IService with the requested peers registered,
        the default table 'kv', and the control API on 127.0.0.1:8060.
        """
        service = tap.makeService(parse("--peer", "echo", "--server-address", "sip:127.0.0.1:5999"))
        verifyObject(IService, service)
        assert isinstance(service, DMQService)
        self.assertEqual(
            [p.channel for p in service.bus.peers()], ["notification_peer", "htable", "echo"]
        )
        tables = service.bus.peers()[1]
        assert IHashTables.providedBy(tables)
        self.assertEqual([t.name for t in tables.tables()], ["kv"])
        (control,) = [s for s in service if isinstance(s, ControlService)]
        assert isinstance(control, ControlService)
        self.assertEqual(control.description, "tcp:8060:interface=127.0.0.1")

    def test_tablesAndNoControl(self) -> None:
        """--htable declares tables (Kamailio options), 'none' turns htable or control off."""
        service = tap.makeService(
            parse("--htable", "a", "--htable", "b=autoexpire=60", "--control", "none")
        )
        assert isinstance(service, DMQService)
        tables = service.bus.peers()[1]
        assert IHashTables.providedBy(tables)
        self.assertEqual(
            [(t.name, t.defaultExpire) for t in tables.tables()], [("a", 0.0), ("b", 60.0)]
        )
        self.assertEqual([s for s in service if isinstance(s, ControlService)], [])
        bare = tap.makeService(parse("--htable", "none", "--control", "none"))
        assert isinstance(bare, DMQService)
        self.assertEqual([p.channel for p in bare.bus.peers()], ["notification_peer"])
        self.assertRaises(usage.UsageError, parse, "--htable", "kv=colour=blue")

    def test_pluginsDiscovered(self) -> None:
        """`twistd dmq` and the bundled peers are found through Twisted's plugin system."""
        import twisted.plugins

        makers = {m.tapname: m for m in getPlugins(IServiceMaker, twisted.plugins)}
        self.assertIn("dmq", makers)
        self.assertEqual({"echo", "htable"} - set(tap.peerFactories()), set())


class RealSocketTests(TestCase):
    """Two nodes on real UDP and TCP sockets of 127.0.0.1."""

    timeout = 30

    def service(self, port: int, seed: int | None = None, transport: str = "udp") -> DMQService:
        suffix = ";transport=tcp" if transport == "tcp" else ""
        config = BusConfig(
            serverAddress=SIPURI.parse(f"sip:127.0.0.1:{port}{suffix}"),
            notificationAddresses=(SIPURI.parse(f"sip:127.0.0.1:{seed}{suffix}"),) if seed else (),
            pingInterval=1.0,
            pingTimeout=1.0,
        )
        service = DMQService(NodeConfig(bus=config), reactor)
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        return service

    @staticmethod
    def status(service: DMQService, port: int) -> str | None:
        for node in service.bus.nodes():
            if node.uri.port == port:
                return node.status.word
        return None

    @inlineCallbacks
    def scenario(self, transport: str) -> Any:
        a, b = allocatePorts(2)
        seed = self.service(a, transport=transport)
        joiner = self.service(b, a, transport=transport)
        joiner.bus.registerPeer(EchoPeer())
        yield waitFor(
            lambda: self.status(seed, b) == "active" and self.status(joiner, a) == "active", 5
        )
        target = seed.bus.findNode(str(joiner.bus.localNode.uri))
        assert target is not None
        delivery = yield seed.bus.send("echo", target, b"x" * 60_000, "application/octet-stream")
        self.assertEqual((delivery.code, len(delivery.body)), (200, 60_000))
        yield joiner.stopService()
        self.assertEqual(self.status(seed, b), "disabled")
        yield waitFor(lambda: self.status(seed, b) is None, 5)

    def test_udp(self) -> Any:
        """
        Over UDP two nodes join, carry a 60,000-byte message each way and see
        a graceful leave at once, then remove the node.
        """
        return self.scenario("udp")

    def test_tcp(self) -> Any:
        """The same over TCP (nodes advertising ;transport=tcp)."""
        return self.scenario("tcp")


class DiscoveryOverSocketsTests(TestCase):
    """--multi-notify end to end: a node finds its seed through a DNS server on 127.0.0.1."""

    timeout = 30

    @inlineCallbacks
    def test_joinThroughDNS(self) -> Any:
        """
        A node whose only notification address is a DNS name resolves it
        and joins the node at the address the name gives.
        """
        from twisted.names import client, dns, server

        from .test_discovery import Zone

        a, b = allocatePorts(2)
        zone = Zone()
        zone.add("seed.test", dns.Record_A("127.0.0.1"))
        dnsPort = cast(Any, reactor).listenUDP(
            0,
            dns.DNSDatagramProtocol(server.DNSServerFactory(authorities=[zone])),
            interface="127.0.0.1",
        )
        self.addCleanup(dnsPort.stopListening)
        seed = DMQService(
            NodeConfig(bus=BusConfig(serverAddress=SIPURI.parse(f"sip:127.0.0.1:{a}"))), reactor
        )
        options = parse(
            "--server-address", f"sip:127.0.0.1:{b}",
            "--multi-notify", "1",
            "--notification-address", f"sip:seed.test:{a}",
            "--control", "none",
            "--htable", "none",
        )  # fmt: skip
        joiner = DMQService(NodeConfig(bus=options["busConfig"]), reactor)
        resolver = client.Resolver(servers=[("127.0.0.1", dnsPort.getHost().port)], reactor=reactor)
        tap.addDiscovery(joiner, options["discoveryAddress"], resolver)
        for node in (seed, joiner):
            node.startService()
            self.addCleanup(self.stop, node)
        yield waitFor(
            lambda: (
                RealSocketTests.status(seed, b) == "active"
                and RealSocketTests.status(joiner, a) == "active"
            ),
            5,
        )
        self.assertEqual(joiner.bus.counters["discovery.seeds_added"], 1)

    @staticmethod
    def stop(node: DMQService) -> Any:
        return node.stopService() if node.running else None


class AccessOptionsTests(SynchronousTestCase):
    """
    The membership-control options: --allow-network, --known-nodes-only,
    --secret-file, --tls-only (with TLS: see tests.test_tls).
    """

    def test_defaultOpen(self) -> None:
        """With none of them the node accepts everyone and signs nothing, as Kamailio."""
        self.assertTrue(parse()["busConfig"].access.isOpen)

    def test_allAccessFlags(self) -> None:
        """Every access option reaches the bus configuration."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"0123456789abcdef-secret\n")
        access = parse(
            "--allow-network", "10.0.0.0/8",
            "--allow-network", "fd00::/64",
            "--known-nodes-only",
            "--secret-file", path,
            "--unsigned-from", "10.0.0.1/32",
            "--signature-window", "30",
        )["busConfig"].access  # fmt: skip
        self.assertEqual([str(n) for n in access.allowNetworks], ["10.0.0.0/8", "fd00::/64"])
        self.assertEqual([str(n) for n in access.unsignedFrom], ["10.0.0.1/32"])
        self.assertEqual(
            (access.knownNodesOnly, access.secret, access.signatureWindow),
            (True, b"0123456789abcdef-secret", 30.0),
        )
        self.assertNotIn("secret", repr(access).replace("secret=", ""))

    def test_badAccessFlags(self) -> None:
        """Bad access options get a usage error naming the option."""
        short = self.mktemp()
        with open(short, "wb") as f:
            f.write(b"short")
        cases = [
            (["--allow-network", "10.0.0.1/8"], "--allow-network"),
            (["--allow-network", "nonsense"], "--allow-network"),
            (["--secret-file", "/nonexistent/secret"], "--secret-file: cannot read"),
            (["--secret-file", short], "at least 16"),
            (["--unsigned-from", "10.0.0.0/8"], "needs --secret-file"),
            (["--signature-window", "0"], "--signature-window"),
            (["--signature-window", "abc"], "--signature-window must be a number > 0"),
            (["--tls-only"], "--tls-only needs a server address with ;transport=tls"),
        ]
        for args, words in cases:
            with self.assertRaises(usage.UsageError, msg=args) as caught:
                parse(*args)
            self.assertIn(words, str(caught.exception), args)
