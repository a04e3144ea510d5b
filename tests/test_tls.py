"""
The TLS transport (C{;transport=tls}) on real sockets of 127.0.0.1, with a
throw-away CA: nodes that share a CA join and talk; a node whose
certificate comes from another CA gets nothing through; the TLS options
refuse what cannot work with a clear message.
"""

# Twisted's assert* methods carry no annotations: calling them is fine here.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from dmq_bus import tap
from dmq_bus.bus.dispatch import BusConfig
from dmq_bus.bus.guard import AccessPolicy
from dmq_bus.bus.nodelist import parseNodeLines
from dmq_bus.bus.values import DeliveryFailed, Node
from dmq_bus.peers.echo import EchoPeer
from dmq_bus.service import DMQService, NodeConfig
from dmq_bus.sip.address import Address
from dmq_bus.sip.message import Response
from dmq_bus.sip.parser import parseMessage
from dmq_bus.sip.tls import TLSContexts
from dmq_bus.sip.transport import SIPTransportLayer, TLSRefused, TransportLimits
from dmq_bus.sip.uri import SIPURI

from .certificates import Authority, NodeFiles
from .interop.kamailio import allocatePorts, waitFor

PING = (
    b"KDMQ sip:notification_peer@127.0.0.1 SIP/2.0\r\n"
    b"Via: SIP/2.0/TLS 127.0.0.1:5061;branch=z9hG4bK-tls-test\r\n"
    b"From: <sip:127.0.0.1:5061>;tag=a\r\nTo: <sip:notification_peer@127.0.0.1>\r\n"
    b"Call-ID: tls-test\r\nCSeq: 1 KDMQ\r\nMax-Forwards: 1\r\nContent-Length: 0\r\n\r\n"
)


def contexts(files: NodeFiles) -> TLSContexts:
    return TLSContexts.fromFiles(files.certificate, files.key, files.ca)


class TLSNodesTests(TestCase):
    """Nodes advertising C{;transport=tls} on real sockets."""

    timeout = 30

    def setUp(self) -> None:
        self.authority = Authority.create("bus CA")
        self.directory = self.mktemp()

    def service(self, port: int, files: NodeFiles, seed: int | None = None) -> DMQService:
        suffix = ";transport=tls"
        config = BusConfig(
            serverAddress=SIPURI.parse(f"sip:127.0.0.1:{port}{suffix}"),
            notificationAddresses=(SIPURI.parse(f"sip:127.0.0.1:{seed}{suffix}"),) if seed else (),
            pingInterval=1.0,
            pingTimeout=1.0,
            requestTimeout=3.0,
        )
        service = DMQService(NodeConfig(bus=config, tls=contexts(files)), reactor)
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
    def test_joinAndEcho(self) -> Any:
        """
        Two nodes with certificates of the same CA join each other over TLS
        and carry a 60,000-byte message to an echo peer and back.
        """
        a, b = allocatePorts(2)
        seed = self.service(a, self.authority.issue(self.directory, "127.0.0.1", "a"))
        joiner = self.service(b, self.authority.issue(self.directory, "127.0.0.1", "b"), a)
        yield self.joinAndEcho(seed, joiner, 60_000)
        for service in (seed, joiner):
            counters = service.stack.transport.counters
            self.assertEqual(counters["tls.handshake_failed"], 0)
            self.assertEqual(counters["tls.refused_by_peer"], 0)
            self.assertEqual(counters["tls.inbound_failed"], 0)

    @inlineCallbacks
    def joinAndEcho(self, seed: DMQService, joiner: DMQService, size: int) -> Any:
        """
        Wait until C{joiner} and C{seed} list each other active, then carry
        a C{size}-byte message over TLS to an echo peer on C{joiner} and back.
        """
        a, b = seed.bus.localNode.uri.port, joiner.bus.localNode.uri.port
        assert a is not None and b is not None
        joiner.bus.registerPeer(EchoPeer())
        yield waitFor(
            lambda: self.status(seed, b) == "active" and self.status(joiner, a) == "active", 5
        )
        target = seed.bus.findNode(str(joiner.bus.localNode.uri))
        assert target is not None
        self.assertEqual(target.transport, "tls")
        delivery = yield seed.bus.send("echo", target, b"x" * size, "application/octet-stream")
        self.assertEqual((delivery.code, delivery.body), (200, b"x" * size))

    @inlineCallbacks
    def test_otherAuthorityRefused(self) -> Any:
        """
        A node whose certificate (and trust) come from another CA cannot
        reach a node of the bus: its request fails with L{DeliveryFailed}
        as soon as the handshake fails, and nothing reaches the other node.
        """
        a, b = allocatePorts(2)
        good = self.service(a, self.authority.issue(self.directory, "127.0.0.1", "good"))
        stranger = Authority.create("other CA").issue(self.directory, "127.0.0.1", "stranger")
        bad = self.service(b, stranger)
        node = Node.fromURI(SIPURI.parse(f"sip:127.0.0.1:{a};transport=tls"))
        started = reactor.seconds()
        failure = yield self.assertFailure(
            bad.bus.send("echo", node, b"x", "text/plain"), DeliveryFailed
        )
        self.assertEqual(failure.code, 408)
        self.assertLess(reactor.seconds() - started, 2.0)  # not the 3 s request timeout
        self.assertEqual(bad.stack.transport.counters["tls.handshake_failed"], 1)
        yield waitFor(lambda: good.stack.transport.counters["tcp.connections_closed"] >= 1, 5)
        self.assertEqual(good.stack.transport.counters["tcp.received"], 0)
        self.assertIsNone(self.status(good, b))

    @inlineCallbacks
    def test_clientCertificateRequired(self) -> Any:
        """
        A client that trusts the bus's CA but presents a certificate of
        another CA is refused by the listening node: nothing it sends is
        received there, and the listening node counts the failed handshake.
        With TLS 1.3 the client's side of the handshake completes first;
        the server's alert then fails the message at once with
        L{TLSRefused}, naming the alert.
        """
        (a,) = allocatePorts(1)
        good = self.service(a, self.authority.issue(self.directory, "127.0.0.1", "good"))
        layer = SIPTransportLayer(None, reactor, reactor, tls=contexts(self.strangerTrustingBus()))
        self.addCleanup(layer.stop)
        failed: Deferred[list[Failure]] = Deferred()
        layer.send(PING, Address("tls", "127.0.0.1", a), lambda f: failed.callback([f]))
        [reason] = yield failed
        self.assertTrue(reason.check(TLSRefused), reason)
        self.assertIn("alert", reason.getErrorMessage())
        self.assertIn("does it trust our certificate?", reason.getErrorMessage())
        self.assertEqual(
            (layer.counters["tls.refused_by_peer"], layer.counters["tls.handshake_failed"]), (1, 0)
        )
        server = good.stack.transport.counters
        yield waitFor(lambda: server["tcp.connections_closed"] >= 1, 5)
        yield waitFor(lambda: not layer._streams and not layer._connecting, 5)
        self.assertEqual(server["tcp.received"], 0)
        self.assertEqual(server["dropped_no_receiver"], 0)
        self.assertEqual(server["tls.inbound_failed"], 1)

    @inlineCallbacks
    def test_refusedClientFailsFast(self) -> Any:
        """
        A node whose certificate the other node does not trust (while it
        trusts the other's) gets L{DeliveryFailed} as soon as the alert
        arrives, well before the request timeout (3 s here, 32 s by
        default), and is never listed by the other node.
        """
        a, b = allocatePorts(2)
        good = self.service(a, self.authority.issue(self.directory, "127.0.0.1", "good"))
        refused = self.service(b, self.strangerTrustingBus())
        node = Node.fromURI(SIPURI.parse(f"sip:127.0.0.1:{a};transport=tls"))
        started = reactor.seconds()
        failure = yield self.assertFailure(
            refused.bus.send("echo", node, b"x", "text/plain"), DeliveryFailed
        )
        self.assertLess(reactor.seconds() - started, 2.0)
        self.assertEqual(failure.code, 408)
        self.assertEqual(refused.stack.transport.counters["tls.refused_by_peer"], 1)
        self.assertEqual(refused.stack.transactions.counters["client.timeouts"], 0)
        self.assertIsNone(self.status(good, b))

    def tlsOnlyService(self, port: int, name: str, seed: int | None = None) -> DMQService:
        """A node made from the options, with --tls-only."""
        files = self.authority.issue(self.directory, "127.0.0.1", name)
        args = [
            "--server-address", f"sip:127.0.0.1:{port};transport=tls",
            "--tls-only",
            "--tls-certificate", files.certificate,
            "--tls-key", files.key,
            "--tls-ca", files.ca,
            "--ping-interval", "1",
            "--ping-timeout", "1",
            "--request-timeout", "3",
        ]  # fmt: skip
        if seed is not None:
            args += ["--notification-address", f"sip:127.0.0.1:{seed};transport=tls"]
        options = tap.Options()
        options.parseOptions(args)
        service = DMQService(
            NodeConfig(bus=options["busConfig"], tls=options["tlsContexts"]), reactor
        )
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        return service

    @inlineCallbacks
    def plainJoin(self, port: int) -> Any:
        """
        Send a Kamailio-style join over plain UDP from a raw socket to
        C{port}; fires with the answer and the socket's port.
        """
        answers: Deferred[Response] = Deferred()

        class Catch(DatagramProtocol):
            def datagramReceived(self, datagram: bytes, addr: Any) -> None:
                message = parseMessage(datagram)  # the node's own requests are skipped
                if isinstance(message, Response) and not answers.called:
                    answers.callback(message)

        catch = Catch()
        listening = cast(Any, reactor).listenUDP(0, catch, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        me = listening.getHost().port
        body = f"sip:127.0.0.1:{me};status=active\r\n".encode()
        join = (
            f"KDMQ sip:notification_peer@127.0.0.1:{port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{me};branch=z9hG4bK-plain-join-{me}\r\n"
            f"To: <sip:notification_peer@127.0.0.1:{port}>\r\n"
            f"From: <sip:notification_peer@127.0.0.1:{me}>;tag=plain\r\n"
            f"CSeq: 10 KDMQ\r\nCall-ID: plain-join-{me}@127.0.0.1\r\n"
            f"Content-Length: {len(body)}\r\nMax-Forwards: 2\r\n"
            f"Content-Type: text/plain\r\n\r\n"
        ).encode() + body
        listening.write(join, ("127.0.0.1", port))
        timeout = reactor.callLater(5, answers.cancel)
        response = yield answers
        timeout.cancel()
        return response, me

    @inlineCallbacks
    def test_tlsOnly(self) -> Any:
        """
        Two nodes with --tls-only form a bus over TLS and carry a message;
        a join sent over plain UDP to the seed's port (it listens on UDP
        too) is answered C{403 Forbidden: TLS Required}, counted, and the
        sender is not listed.
        """
        a, b = allocatePorts(2)
        seed = self.tlsOnlyService(a, "a")
        joiner = self.tlsOnlyService(b, "b", a)
        yield self.joinAndEcho(seed, joiner, 1000)
        response, me = yield self.plainJoin(a)
        self.assertEqual((response.code, response.reason), (403, "Forbidden: TLS Required"))
        self.assertIsNone(self.status(seed, me))
        self.assertEqual(sorted(n.uri.port for n in seed.bus.nodes()), sorted([a, b]))
        for service in (seed, joiner):
            self.assertEqual(
                service.bus.counters["in.forbidden.not_tls"], 1 if service is seed else 0
            )

    @inlineCallbacks
    def test_plainJoinWithoutTLSOnly(self) -> Any:
        """
        Without --tls-only the same plain UDP join to a TLS node is
        accepted, and the sender is listed (what --tls-only closes).
        """
        (a,) = allocatePorts(1)
        node = self.service(a, self.authority.issue(self.directory, "127.0.0.1", "open"))
        response, me = yield self.plainJoin(a)
        self.assertEqual(response.code, 200)
        self.assertEqual(self.status(node, me), "active")

    def strangerTrustingBus(self) -> NodeFiles:
        """A certificate of another CA, with the bus's CA as the trusted bundle."""
        stranger = Authority.create("other CA").issue(self.directory, "127.0.0.1", "stranger")
        busCA = self.authority.issue(self.directory, "127.0.0.1", "any")
        return NodeFiles(stranger.certificate, stranger.key, busCA.ca)

    @inlineCallbacks
    def test_wrongAddressRefused(self) -> Any:
        """
        A certificate of the right CA that names another IP address is
        refused by the node connecting to it: the send fails at once.
        """
        (a,) = allocatePorts(1)
        self.service(a, self.authority.issue(self.directory, "127.0.0.2", "elsewhere"))
        client = contexts(self.authority.issue(self.directory, "127.0.0.1", "client"))
        layer = SIPTransportLayer(None, reactor, reactor, tls=client)
        self.addCleanup(layer.stop)
        failed: Deferred[list[Failure]] = Deferred()
        layer.send(PING, Address("tls", "127.0.0.1", a), lambda f: failed.callback([f]))
        [reason] = yield failed
        self.assertIn("IPAddressMismatch", repr(reason.value))
        self.assertEqual(layer.counters["tls.handshake_failed"], 1)

    @inlineCallbacks
    def test_handshakeTimeout(self) -> Any:
        """
        A peer that accepts the connection but never answers the handshake
        fails the queued message after the connect timeout.
        """
        silent = cast(Any, reactor).listenTCP(
            0, Factory.forProtocol(Protocol), interface="127.0.0.1"
        )
        self.addCleanup(silent.stopListening)
        client = contexts(self.authority.issue(self.directory, "127.0.0.1", "client"))
        layer = SIPTransportLayer(
            None, reactor, reactor, limits=TransportLimits(connectTimeout=0.2), tls=client
        )
        self.addCleanup(layer.stop)
        failed: Deferred[list[Failure]] = Deferred()
        port = silent.getHost().port
        started = reactor.seconds()
        layer.send(PING, Address("tls", "127.0.0.1", port), lambda f: failed.callback([f]))
        [reason] = yield failed
        self.assertTrue(reason.check(ConnectionLost), reason)
        self.assertGreaterEqual(reactor.seconds() - started, 0.2)
        self.assertEqual(
            (layer.counters["tls.handshake_failed"], layer.counters["tcp.connect_failed"]), (1, 1)
        )


class TLSErrorTextTests(SynchronousTestCase):
    """L{TLSContexts.errorText} tells TLS errors from other connection losses."""

    def test_alert(self) -> None:
        """An OpenSSL error gives its reasons."""
        error = SSL.Error([("SSL routines", "", "tlsv1 alert unknown ca")])
        self.assertEqual(TLSContexts.errorText(Failure(error)), "tlsv1 alert unknown ca")

    def test_severalReasons(self) -> None:
        """Several reasons are joined; an error without any gives its text."""
        error = SSL.Error([("a", "f", "one"), ("b", "g", "two")])
        self.assertEqual(TLSContexts.errorText(Failure(error)), "one; two")
        self.assertEqual(TLSContexts.errorText(Failure(SSL.Error("bare"))), "bare")

    def test_notTLS(self) -> None:
        """A closed or lost connection is no TLS error."""
        self.assertIsNone(TLSContexts.errorText(Failure(ConnectionDone())))
        self.assertIsNone(TLSContexts.errorText(Failure(ConnectionLost())))


class SipsLineTests(SynchronousTestCase):
    """
    A C{sips:} line in a node-list body is read as Kamailio 5.6.3 reads it:
    the scheme is ignored (Kamailio's DMQ keeps only host, port and
    C{;transport=}, and rebuilds every URI it sends with C{sip:}).
    """

    def node(self, line: bytes) -> Node:
        [parsed] = parseNodeLines(line)
        return Node.fromURI(parsed.uri)

    def test_noTransportIsUDP(self) -> None:
        """C{sips:h:p} is the UDP node C{sip:h:p}, not a TLS one."""
        node = self.node(b"sips:127.0.0.1:5061;status=active\r\n")
        self.assertEqual((str(node.uri), node.transport), ("sip:127.0.0.1:5061", "udp"))
        self.assertEqual(node.key, Node.fromURI(SIPURI.parse("sip:127.0.0.1:5061")).key)

    def test_transportTLS(self) -> None:
        """C{sips:h:p;transport=tls} is the TLS node C{sip:h:p;transport=tls}."""
        node = self.node(b"sips:127.0.0.1:5061;transport=tls;status=active\r\n")
        self.assertEqual(str(node.uri), "sip:127.0.0.1:5061;transport=tls")
        self.assertEqual(node.address, Address("tls", "127.0.0.1", 5061))


class TLSOptionsTests(SynchronousTestCase):
    """The TLS options refuse, with a clear usage error, what cannot work."""

    def setUp(self) -> None:
        self.files = Authority.create("options CA").issue(self.mktemp(), "127.0.0.1", "node")

    def refused(self, *args: str) -> str:
        with self.assertRaises(usage.UsageError) as caught:
            tap.Options().parseOptions(list(args))
        return str(caught.exception)

    def test_allThree(self) -> None:
        """With certificate, key and CA a tls server address gives a node listening for TLS."""
        options = tap.Options()
        options.parseOptions([
            "--server-address", "sip:127.0.0.1:5061;transport=tls",
            "--tls-certificate", self.files.certificate,
            "--tls-key", self.files.key,
            "--tls-ca", self.files.ca,
        ])  # fmt: skip
        service = tap.makeService(options)
        assert isinstance(service, DMQService)
        self.assertIsInstance(service.config.tls, TLSContexts)

    def test_missingKeyFile(self) -> None:
        """A key file that does not exist is named in the error."""
        missing = str(Path(self.mktemp()) / "node.key")
        error = self.refused(
            "--tls-certificate", self.files.certificate,
            "--tls-key", missing,
            "--tls-ca", self.files.ca,
        )  # fmt: skip
        self.assertIn(f"cannot read the key {missing!r}", error)

    def test_missingCertificateFile(self) -> None:
        """A certificate file that does not exist is named in the error."""
        missing = str(Path(self.mktemp()) / "node.pem")
        error = self.refused(
            "--tls-certificate", missing, "--tls-key", self.files.key, "--tls-ca", self.files.ca
        )
        self.assertIn(f"cannot read the certificate {missing!r}", error)

    def test_notPEM(self) -> None:
        """A CA bundle holding no certificate is refused, naming the file."""
        empty = self.mktemp()
        Path(empty).write_text("nothing here\n")
        error = self.refused(
            "--tls-certificate", self.files.certificate, "--tls-key", self.files.key,
            "--tls-ca", empty,
        )  # fmt: skip
        self.assertIn(f"--tls-ca: no PEM certificate in the CA bundle {empty!r}", error)

    def test_keyOfAnotherCertificate(self) -> None:
        """A key that is not the certificate's is refused."""
        other = Authority.create("options CA").issue(self.mktemp(), "127.0.0.1", "other")
        error = self.refused(
            "--tls-certificate", self.files.certificate, "--tls-key", other.key,
            "--tls-ca", self.files.ca,
        )  # fmt: skip
        self.assertIn("is not the key of", error)

    def test_incomplete(self) -> None:
        """A certificate alone is refused, naming the options missing."""
        error = self.refused("--tls-certificate", self.files.certificate)
        self.assertIn("--tls-certificate needs --tls-key and --tls-ca too", error)

    def test_tlsAddressWithoutSettings(self) -> None:
        """A tls server or seed address without the TLS options is refused."""
        error = self.refused("--server-address", "sip:127.0.0.1:5061;transport=tls")
        self.assertIn("uses TLS: give --tls-certificate, --tls-key and --tls-ca", error)
        error = self.refused("--notification-address", "sip:127.0.0.9:5061;transport=tls")
        self.assertIn("sip:127.0.0.9:5061;transport=tls uses TLS", error)

    def test_sipsRefused(self) -> None:
        """
        sips: addresses are refused: Kamailio 5.6.3's DMQ ignores the scheme
        (a sips: server_address runs over UDP, in clear), so reading one as
        TLS would differ from Kamailio, and as UDP would mislead.
        """
        error = self.refused("--server-address", "sips:127.0.0.1:5061")
        self.assertEqual(
            error,
            "--server-address: sips: is not supported: Kamailio 5.6.3's DMQ ignores the "
            "scheme (sips:127.0.0.1:5061 runs over UDP, in clear); "
            "write sip:127.0.0.1:5061;transport=tls",
        )
        error = self.refused("--notification-address", "sips:127.0.0.9:5071")
        self.assertIn("--notification-address: sips: is not supported: Kamailio 5.6.3's DMQ", error)
        self.assertIn("write sip:127.0.0.9:5071;transport=tls", error)

    def tlsOnly(self, *args: str) -> list[str]:
        return [
            "--tls-only",
            "--tls-certificate", self.files.certificate,
            "--tls-key", self.files.key,
            "--tls-ca", self.files.ca,
            *args,
        ]  # fmt: skip

    def test_tlsOnly(self) -> None:
        """--tls-only with a tls server address and the TLS files: a TLS-only node."""
        options = tap.Options()
        options.parseOptions(
            self.tlsOnly(
                "--server-address", "sip:127.0.0.1:5061;transport=tls",
                "--notification-address", "sip:127.0.0.9:5061;transport=tls",
            )
        )  # fmt: skip
        self.assertTrue(options["busConfig"].access.tlsOnly)
        service = tap.makeService(options)
        assert isinstance(service, DMQService)
        self.assertTrue(service.config.bus.access.tlsOnly)

    def test_tlsOnlyNeedsTLSServerAddress(self) -> None:
        """--tls-only on a UDP or TCP server address is refused, naming the option."""
        for address in ("sip:127.0.0.1:5061", "sip:127.0.0.1:5061;transport=tcp"):
            error = self.refused(*self.tlsOnly("--server-address", address))
            self.assertIn(
                f"--tls-only needs a server address with ;transport=tls, not {address}", error
            )

    def test_tlsOnlyNeedsTLSSettings(self) -> None:
        """--tls-only without the TLS files is refused, naming what is missing."""
        error = self.refused("--tls-only", "--server-address", "sip:127.0.0.1:5061;transport=tls")
        self.assertIn("--tls-only needs --tls-certificate, --tls-key, --tls-ca", error)
        error = self.refused(
            "--tls-only", "--server-address", "sip:127.0.0.1:5061;transport=tls",
            "--tls-certificate", self.files.certificate,
        )  # fmt: skip
        self.assertIn("--tls-only needs --tls-key, --tls-ca", error)

    def test_tlsOnlyNeedsTLSSeeds(self) -> None:
        """A seed that is not ;transport=tls is refused with --tls-only."""
        error = self.refused(
            *self.tlsOnly(
                "--server-address", "sip:127.0.0.1:5061;transport=tls",
                "--notification-address", "sip:127.0.0.9:5060",
            )
        )  # fmt: skip
        self.assertIn("--tls-only: seed sip:127.0.0.9:5060 is not ;transport=tls", error)

    def test_serviceRefusesTLSOnlyWithoutTLS(self) -> None:
        """From Python too, a TLS-only node needs a tls server address and TLS settings."""
        access = AccessPolicy(tlsOnly=True)
        plain = BusConfig(serverAddress=SIPURI.parse("sip:127.0.0.1:5061"), access=access)
        tls = BusConfig(
            serverAddress=SIPURI.parse("sip:127.0.0.1:5061;transport=tls"), access=access
        )
        with self.assertRaises(ValueError) as caught:
            DMQService(NodeConfig(bus=plain, tls=contexts(self.files)), reactor)
        self.assertIn(";transport=tls", str(caught.exception))
        with self.assertRaises(ValueError) as caught:
            DMQService(NodeConfig(bus=tls), reactor)
        self.assertIn("TLS settings", str(caught.exception))
        DMQService(NodeConfig(bus=tls, tls=contexts(self.files)), reactor)
