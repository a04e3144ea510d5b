"""
Membership control: who may send to a node (TLS only, source networks,
known nodes, a shared secret), on in-memory nodes and with requests handed
to the bus directly.
"""

from __future__ import annotations

import os
import re
from typing import Any

from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from dmq_bus.bus.guard import (
    AUTH_HEADER,
    FORBIDDEN_NOT_TLS,
    AccessPolicy,
    Guard,
    loadSecret,
    parseNetworks,
)
from dmq_bus.bus.values import DeliveryFailed, Node, NodeStatus
from dmq_bus.peers.htable import HTablePeer, TableSpec
from dmq_bus.sip.address import Address, Origin
from dmq_bus.sip.message import Request, Response
from dmq_bus.sip.parser import parseMessage
from dmq_bus.testing import MemoryNetwork, MemoryNode

from .test_bus import FAST, KAMAILIO_JOIN, RecordingPeer, allActive

SECRET = b"correct horse battery staple"
OTHER_SECRET = b"a different secret of the bus"


def signedPolicy(**kwargs: Any) -> AccessPolicy:
    return AccessPolicy(secret=SECRET, **kwargs)


def origin(host: str, port: int = 5060) -> Origin:
    return Origin(Address("udp", host, port))


def target(sender: MemoryNode, receiver: MemoryNode) -> Node:
    """C{receiver} as C{sender} addresses it (listed or not)."""
    found = sender.bus.findNode(receiver.uri)
    if found is not None:
        return found
    return Node.fromURI(receiver.stack.config.bus.serverAddress)


def answer(node: MemoryNode, request: Request, source: str) -> Response:
    response = node.bus.requestReceived(request, origin(source))
    assert isinstance(response, Response)
    return response


def withHeader(request: Request, name: str, value: str) -> Request:
    return request.withHeaders(request.headers.replacing(name, value))


class PolicyTests(SynchronousTestCase):
    """The policy object, its checks, and the parsing of networks and secrets."""

    def test_defaultIsOpen(self) -> None:
        """By default a node accepts everyone and has no guard at all, as Kamailio."""
        self.assertTrue(AccessPolicy().isOpen)
        node = MemoryNetwork().addNode("127.0.0.1", start=False)
        self.assertIsNone(node.bus.guard)

    def test_inconsistentPolicies(self) -> None:
        """A short secret, unsigned-from without a secret, or a zero window are refused."""
        self.assertRaises(ValueError, AccessPolicy, secret=b"short")
        self.assertRaises(ValueError, AccessPolicy, unsignedFrom=parseNetworks(["10.0.0.0/8"]))
        self.assertRaises(ValueError, signedPolicy, signatureWindow=0)
        self.assertRaises(ValueError, signedPolicy, replayCacheSize=0)
        self.assertRaises(TypeError, AccessPolicy, allowNetworks=["10.0.0.0/8"])

    def test_tlsOnlyIsNotOpen(self) -> None:
        """A TLS-only policy is a policy: the node gets a guard."""
        self.assertFalse(AccessPolicy(tlsOnly=True).isOpen)
        node = MemoryNetwork().addNode("127.0.0.1", start=False, access=AccessPolicy(tlsOnly=True))
        self.assertIsNotNone(node.bus.guard)

    def test_parseNetworks(self) -> None:
        """Networks are CIDR (v4 or v6, or one address); host bits or junk are refused."""
        self.assertEqual(
            [str(n) for n in parseNetworks(["10.0.0.0/8", "fd00::/64", "192.0.2.7"])],
            ["10.0.0.0/8", "fd00::/64", "192.0.2.7/32"],
        )
        for bad in ("10.0.0.5/8", "nonsense", "10.0.0.0/33"):
            with self.assertRaises(ValueError, msg=bad) as caught:
                parseNetworks([bad])
            self.assertIn(repr(bad), str(caught.exception))

    def test_loadSecret(self) -> None:
        """A secret file's trailing newline is dropped; short or missing files are refused."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(SECRET + b"\n")
        self.assertEqual(loadSecret(path), SECRET)
        with open(path, "wb") as f:
            f.write(b"tooshort\n")
        self.assertIn("at least 16", str(self.assertRaises(ValueError, loadSecret, path)))
        os.remove(path)
        self.assertIn("cannot read", str(self.assertRaises(ValueError, loadSecret, path)))


class NetworkTests(SynchronousTestCase):
    """--allow-network: requests from other networks get 403 and reach no peer."""

    def setUp(self) -> None:
        network = MemoryNetwork()
        self.sender = network.addNode("127.0.0.1", start=False)
        self.node = network.addNode(
            "127.0.0.2",
            start=False,
            access=AccessPolicy(allowNetworks=parseNetworks(["10.0.0.0/8", "fd00::/64"])),
        )
        self.peer = RecordingPeer()
        self.node.registerPeer(self.peer)

    def request(self, channel: str = "app") -> Request:
        return self.sender.bus.buildRequest(
            channel, target(self.sender, self.node), b"x", "text/plain", 1
        )

    def test_insideAccepted(self) -> None:
        """Requests from an allowed network (v4, v6, v4-mapped v6) reach the peer."""
        for source in ("10.1.2.3", "fd00::7", "::ffff:10.9.9.9"):
            self.assertEqual(answer(self.node, self.request(), source).code, 200, source)
        self.assertEqual(len(self.peer.messages), 3)
        self.assertEqual(self.node.bus.counters["in.forbidden.network"], 0)

    def test_outsideRefused(self) -> None:
        """
        A request from elsewhere (or of unknown origin) gets 403 Forbidden,
        counted, whatever its channel or method; the peer never sees it.
        """
        refused = [
            answer(self.node, self.request(), "192.0.2.1"),
            answer(self.node, self.request("notification_peer"), "fd01::1"),
            answer(self.node, self.request("nosuchchannel"), "192.0.2.1"),
        ]
        options = Request("OPTIONS", self.request().uri, self.request().headers)
        refused.append(answer(self.node, options, "192.0.2.1"))
        none = self.node.bus.requestReceived(self.request(), None)  # type: ignore[arg-type]
        assert isinstance(none, Response)
        refused.append(none)
        self.assertEqual([(r.code, r.reason) for r in refused], [(403, "Forbidden")] * 5)
        self.assertEqual(self.peer.messages, [])
        self.assertEqual(self.node.bus.counters["in.forbidden.network"], 5)
        self.assertEqual(self.node.bus.counters["in.requests.app"], 0)

    def test_loggedOncePerSource(self) -> None:
        """
        Each refused source is logged once per reason, with structured
        fields; further refusals are only counted.
        """
        events: list[dict[str, Any]] = []
        guard = self.node.bus.guard
        assert guard is not None
        guard.log = Logger(observer=events.append)  # type: ignore[arg-type]
        for _ in range(3):
            answer(self.node, self.request(), "192.0.2.1")
        answer(self.node, self.request(), "192.0.2.2")
        self.assertEqual(
            [e["source"] for e in events], ["udp:192.0.2.1:5060", "udp:192.0.2.2:5060"]
        )
        self.assertEqual(events[0]["reason"], "in.forbidden.network")
        self.assertEqual(events[0]["code"], 403)
        self.assertEqual(events[0]["channel"], "app")
        self.assertIn(self.sender.uri.removeprefix("sip:"), events[0]["node"])
        self.assertEqual(self.node.bus.counters["in.forbidden.network"], 4)


class KnownNodesTests(SynchronousTestCase):
    """--known-nodes-only: application channels only from nodes listed active."""

    def setUp(self) -> None:
        self.network = MemoryNetwork()
        self.a = self.network.addNode("127.0.0.1", **FAST)
        self.b = self.network.addNode(
            "127.0.0.2", seeds=[self.a], access=AccessPolicy(knownNodesOnly=True), **FAST
        )
        self.peer = RecordingPeer()
        self.b.registerPeer(self.peer)
        self.network.run(0.1)

    def test_activeNodeAccepted(self) -> None:
        """A message from a node the receiver lists active is delivered."""
        d = self.a.bus.send("app", target(self.a, self.b), b"x", "text/plain")
        self.network.run(0.01)
        self.assertEqual(self.successResultOf(d).code, 200)
        self.assertEqual(len(self.peer.messages), 1)

    def test_strangerRefused(self) -> None:
        """
        A node the receiver does not list gets 403 on an application channel
        (counted, peer untouched), but may still join on the notification
        channel, after which its messages are accepted.
        """
        c = self.network.addNode("127.0.0.3", seeds=[self.b], start=False, **FAST)
        d = c.bus.send("app", target(c, self.b), b"x", "text/plain")
        self.network.run(0.01)
        self.assertEqual(self.successResultOf(d).code, 403)
        self.assertEqual(self.peer.messages, [])
        self.assertEqual(self.b.bus.counters["in.forbidden.unknown_node"], 1)
        c.stack.start()
        self.network.run(0.1)
        self.assertEqual(self.b.statuses()[c.uri], "active")
        d = c.bus.send("app", target(c, self.b), b"x", "text/plain")
        self.network.run(0.01)
        self.assertEqual(self.successResultOf(d).code, 200)

    def test_disabledNodeRefused(self) -> None:
        """A node that is listed but not active (here: disabled) is refused too."""
        request = self.a.bus.buildRequest("app", target(self.a, self.b), b"x", "text/plain", 1)
        entry = self.b.bus.findNode(self.a.uri)
        assert entry is not None
        self.b.bus.nodeList.setStatus(entry.key, NodeStatus.DISABLED)
        self.assertEqual(answer(self.b, request, "127.0.0.1").code, 403)
        self.assertEqual(self.b.bus.counters["in.forbidden.unknown_node"], 1)


class TLSOnlyTests(SynchronousTestCase):
    """
    --tls-only: a request that did not arrive over TLS (its origin's
    transport) gets 403 and reaches no peer; one over TLS goes on.
    """

    def setUp(self) -> None:
        network = MemoryNetwork()
        self.sender = network.addNode("127.0.0.1", start=False)
        self.node = network.addNode("127.0.0.2", start=False, access=AccessPolicy(tlsOnly=True))
        self.peer = RecordingPeer()
        self.node.registerPeer(self.peer)

    def request(self, channel: str = "app") -> Request:
        return self.sender.bus.buildRequest(
            channel, target(self.sender, self.node), b"x", "text/plain", 1
        )

    def over(self, transport: str, request: Request, host: str = "127.0.0.1") -> Response:
        response = self.node.bus.requestReceived(request, Origin(Address(transport, host, 5061)))
        assert isinstance(response, Response)
        return response

    def test_udpRefused(self) -> None:
        """
        A KDMQ over UDP gets C{403 Forbidden: TLS Required}, counted as
        C{in.forbidden.not_tls}; the peer never sees it.
        """
        response = self.over("udp", self.request())
        self.assertEqual((response.code, response.reason), (403, "Forbidden: TLS Required"))
        self.assertEqual(self.node.bus.counters["in.forbidden.not_tls"], 1)
        self.assertEqual(self.node.bus.counters["in.requests.app"], 0)
        self.assertEqual(self.peer.messages, [])

    def test_tlsAccepted(self) -> None:
        """The same request over TLS reaches the peer; nothing is refused."""
        self.assertEqual(self.over("tls", self.request()).code, 200)
        self.assertEqual(len(self.peer.messages), 1)
        self.assertEqual(self.node.bus.counters["in.forbidden.not_tls"], 0)

    def test_everyPlainTransportRefused(self) -> None:
        """
        Plain TCP, an unknown origin, a join on the notification channel,
        a channel that does not exist (no 404 to probe with) and OPTIONS
        are all refused alike.
        """
        options = Request("OPTIONS", self.request().uri, self.request().headers)
        refused = [
            self.over("tcp", self.request()),
            self.over("udp", self.request("notification_peer")),
            self.over("udp", self.request("nosuchchannel")),
            self.over("udp", options),
        ]
        none = self.node.bus.requestReceived(self.request(), None)  # type: ignore[arg-type]
        assert isinstance(none, Response)
        refused.append(none)
        self.assertEqual([r.code for r in refused], [403] * 5)
        self.assertEqual(self.node.bus.counters["in.forbidden.not_tls"], 5)
        self.assertEqual(self.node.bus.counters["in.unknown_channel"], 0)
        self.assertEqual([n.uri for n in self.node.bus.nodes()], [self.node.bus.localNode.uri])

    def test_plainNodesInListsSkipped(self) -> None:
        """
        A node list that arrives over TLS and names plain UDP/TCP nodes adds
        only its C{;transport=tls} nodes (the others counted as
        C{notification.lines_not_tls}): we never send to a node in clear.
        """
        request = self.sender.bus.buildRequest(
            "notification_peer",
            target(self.sender, self.node),
            b"sip:127.0.0.7:5061;transport=tls;status=active\r\n"
            b"sip:127.0.0.8:5060;status=active\r\n"
            b"sip:127.0.0.9:5060;transport=tcp;status=active\r\n",
            "text/plain",
            1,
        )
        self.assertEqual(self.over("tls", request).code, 200)
        listed = {str(n.uri) for n in self.node.bus.nodes()}
        self.assertIn("sip:127.0.0.7:5061;transport=tls", listed)
        self.assertNotIn("sip:127.0.0.8:5060", listed)
        self.assertNotIn("sip:127.0.0.9:5060;transport=tcp", listed)
        self.assertEqual(self.node.bus.counters["notification.lines_not_tls"], 2)

    def test_checkedFirst(self) -> None:
        """
        The transport is checked before the source network and the
        signature: a UDP request from a refused network, unsigned, counts
        as not_tls only.
        """
        node = MemoryNetwork().addNode(
            "127.0.0.3",
            start=False,
            access=signedPolicy(tlsOnly=True, allowNetworks=parseNetworks(["10.0.0.0/8"])),
        )
        response = node.bus.requestReceived(self.request(), origin("192.0.2.1"))
        assert isinstance(response, Response)
        self.assertEqual(response.code, 403)
        counters = node.bus.counters
        self.assertEqual(
            (counters["in.forbidden.not_tls"], counters["in.forbidden.network"]), (1, 0)
        )
        self.assertEqual(counters["in.forbidden.unsigned"], 0)

    def test_loggedOncePerSource(self) -> None:
        """Each refused source is logged once, with the reason; then only counted."""
        events: list[dict[str, Any]] = []
        guard = self.node.bus.guard
        assert guard is not None
        guard.log = Logger(observer=events.append)  # type: ignore[arg-type]
        for _ in range(3):
            self.over("udp", self.request(), "192.0.2.1")
        self.over("udp", self.request(), "192.0.2.2")
        self.assertEqual(
            [e["source"] for e in events], ["udp:192.0.2.1:5061", "udp:192.0.2.2:5061"]
        )
        self.assertEqual(events[0]["reason"], "in.forbidden.not_tls")
        self.assertIn("not over TLS", events[0]["detail"])
        self.assertEqual(self.node.bus.counters["in.forbidden.not_tls"], 4)

    def test_answersToOwnRequestsAccepted(self) -> None:
        """
        Answers are not requests: a TLS-only node's own request, answered
        over UDP, gets its answer.
        """
        network = MemoryNetwork()
        open_ = network.addNode("127.0.0.1", start=False)
        open_.registerPeer(RecordingPeer())
        only = network.addNode("127.0.0.2", start=False, access=AccessPolicy(tlsOnly=True))
        d = only.bus.send("app", target(only, open_), b"x", "text/plain")
        network.run(0.01)
        self.assertEqual(self.successResultOf(d).code, 200)
        self.assertEqual(only.bus.counters["in.forbidden.not_tls"], 0)


_AUTH = re.compile(r"v1;ts=[0-9]+;nonce=[0-9a-f]{32};sig=[0-9a-f]{64}")


class SignatureTests(SynchronousTestCase):
    """--secret-file: signed requests and answers between nodes sharing a secret."""

    def setUp(self) -> None:
        self.network = MemoryNetwork()
        self.a = self.network.addNode("127.0.0.1", access=signedPolicy(), **FAST)
        self.b = self.network.addNode("127.0.0.2", seeds=[self.a], access=signedPolicy(), **FAST)
        self.peer = RecordingPeer()
        self.b.registerPeer(self.peer)
        self.network.run(0.1)

    def request(self, body: bytes = b"x") -> Request:
        return self.a.bus.buildRequest("app", target(self.a, self.b), body, "text/plain", 1)

    def test_sameSecretFormsBus(self) -> None:
        """Nodes with the same secret join, stay active and exchange messages."""
        c = self.network.addNode("127.0.0.3", seeds=[self.a], access=signedPolicy(), **FAST)
        self.network.run(5.0)
        self.assertTrue(allActive([self.a, self.b, c]))
        d = self.a.bus.send("app", target(self.a, self.b), b"x", "text/plain")
        self.network.run(0.01)
        self.assertEqual(self.successResultOf(d).code, 200)
        self.assertGreater(self.b.bus.counters["in.authenticated"], 0)
        forbidden = [k for k, v in self.b.bus.counters.items() if "forbidden" in k and v]
        self.assertEqual(forbidden, [])

    def test_signatureIsLastHeader(self) -> None:
        """The signature is one header after Kamailio's, which keep their order."""
        request = self.request()
        self.assertEqual(
            [name for name, _ in request.headers],
            [
                *("To", "From", "CSeq", "Call-ID", "Content-Length", "User-Agent"),
                *("Max-Forwards", "Content-Type", AUTH_HEADER),
            ],
        )
        self.assertRegex(request.headers.get(AUTH_HEADER) or "", _AUTH)
        parsed = parseMessage(request.withHeaders(
            request.headers.prepending("Via", "SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKx")
        ).toBytes())  # fmt: skip
        assert isinstance(parsed, Request)
        self.assertEqual(answer(self.b, parsed, "127.0.0.1").code, 200)

    def test_missingSignature(self) -> None:
        """An unsigned request (a node without the secret) gets 403, counted."""
        response = answer(self.b, withHeader(self.request(), AUTH_HEADER, "").withHeaders(
            self.request().headers.without(AUTH_HEADER)
        ), "127.0.0.1")  # fmt: skip
        self.assertEqual(response.code, 403)
        self.assertEqual(self.b.bus.counters["in.forbidden.unsigned"], 1)
        self.assertEqual(self.peer.messages, [])

    def test_badSignature(self) -> None:
        """
        A changed body, channel, sender or header value, a malformed or
        doubled signature, or another secret's signature: 403, counted.
        """
        good = self.request()
        value = good.headers.get(AUTH_HEADER) or ""
        outsider = MemoryNetwork().addNode(
            "127.0.0.1", start=False, access=AccessPolicy(secret=OTHER_SECRET)
        )
        bad = [
            Request(good.method, good.uri, good.headers, b"y"),
            withHeader(good, "From", "<sip:app@127.0.0.9:5060>;tag=1"),
            withHeader(good, "Max-Forwards", "2"),
            withHeader(good, AUTH_HEADER, value[:-1] + ("0" if value[-1] != "0" else "1")),
            withHeader(good, AUTH_HEADER, "v2;" + value[3:]),
            good.withHeaders(good.headers.appending(AUTH_HEADER, value)),
            outsider.bus.buildRequest("app", target(self.a, self.b), b"x", "text/plain", 1),
        ]
        for request in bad:
            self.assertEqual(answer(self.b, request, "127.0.0.1").code, 403, request.headers)
        self.assertEqual(self.b.bus.counters["in.forbidden.bad_signature"], len(bad))
        self.assertEqual(self.peer.messages, [])
        self.assertEqual(answer(self.b, good, "127.0.0.1").code, 200)

    def test_staleSignature(self) -> None:
        """A request signed more than the window (60 s) ago, or ahead, gets 403."""
        old = self.request()
        self.network.clock.advance(59)
        self.assertEqual(answer(self.b, self.request(), "127.0.0.1").code, 200)
        self.network.clock.advance(2)
        self.assertEqual(answer(self.b, old, "127.0.0.1").code, 403)
        self.assertEqual(self.b.bus.counters["in.forbidden.stale"], 1)
        early = MemoryNetwork()
        early.clock.advance(self.network.clock.seconds() + 120)
        ahead = early.addNode("127.0.0.1", start=False, access=signedPolicy())
        request = ahead.bus.buildRequest("app", target(self.a, self.b), b"x", "text/plain", 1)
        self.assertEqual(answer(self.b, request, "127.0.0.1").code, 403)
        self.assertEqual(self.b.bus.counters["in.forbidden.stale"], 2)

    def test_replayed(self) -> None:
        """The same signed request seen twice (a new branch, a replay) gets 403 the second time."""
        request = self.request()
        self.assertEqual(answer(self.b, request, "127.0.0.1").code, 200)
        self.assertEqual(answer(self.b, request, "127.0.0.1").code, 403)
        self.assertEqual(self.b.bus.counters["in.forbidden.replayed"], 1)
        self.assertEqual(len(self.peer.messages), 1)

    def test_replayCacheFull(self) -> None:
        """
        With the replay cache full of unexpired nonces, a new signed request
        gets 503 (never accepted unchecked); once nonces expire there is room.
        """
        node = self.network.addNode(
            "127.0.0.4", start=False, access=signedPolicy(replayCacheSize=2)
        )
        node.registerPeer(RecordingPeer())
        sender = self.a

        def send() -> int:
            request = sender.bus.buildRequest("app", target(sender, node), b"", "text/plain", 1)
            return answer(node, request, "127.0.0.1").code

        self.assertEqual([send(), send(), send()], [200, 200, 503])
        self.assertEqual(node.bus.counters["in.refused.replay_cache_full"], 1)
        self.network.clock.advance(61)
        self.assertEqual(send(), 200)
        guard = node.bus.guard
        assert guard is not None
        self.assertEqual(len(guard.replays), 1)

    def test_responsesSigned(self) -> None:
        """The answer to a signed request is signed for that request (header last)."""
        response = answer(self.b, self.request(), "127.0.0.1")
        self.assertEqual(response.headers.fields[-1][0], AUTH_HEADER)
        self.assertRegex(response.headers.get(AUTH_HEADER) or "", r"^v1;sig=[0-9a-f]{64}$")

    def test_forgedResponseIgnored(self) -> None:
        """
        A 200 to a ping whose node list was changed in flight (to inject a
        node) is not believed: it counts as no answer, nothing is added.
        """
        original = self.network.deliver

        def tamper(source: Any, destination: Any, packet: bytes) -> None:
            if packet.startswith(b"SIP/2.0 200") and b"text/plain" in packet:
                packet = packet.replace(
                    b"sip:127.0.0.2:5060;status=active", b"sip:127.0.0.66:5060;status=active"
                )
            original(source, destination, packet)

        self.network.deliver = tamper  # type: ignore[method-assign]
        d = self.a.bus.send("notification_peer", target(self.a, self.b), b"", "text/plain")
        self.network.run(0.01)
        failure = self.failureResultOf(d, DeliveryFailed)
        self.assertEqual(failure.value.code, 408)
        self.assertNotIn("sip:127.0.0.66:5060", self.a.statuses())
        self.assertGreater(self.a.bus.counters["out.unauthenticated_responses"], 0)

    def test_nodeWithoutSecretCannotJoin(self) -> None:
        """
        A node without the secret (or with another one) is never listed by
        the bus, and its requests are refused.
        """
        open_ = self.network.addNode("127.0.0.5", seeds=[self.a], **FAST)
        other = self.network.addNode(
            "127.0.0.6", seeds=[self.a], access=AccessPolicy(secret=OTHER_SECRET), **FAST
        )
        self.network.run(5.0)
        for node in (self.a, self.b):
            self.assertNotIn(open_.uri, node.statuses())
            self.assertNotIn(other.uri, node.statuses())
        self.assertGreater(self.a.bus.counters["in.forbidden.unsigned"], 0)
        self.assertGreater(self.a.bus.counters["in.forbidden.bad_signature"], 0)


def addHTableNode(network: MemoryNetwork, host: str, **options: Any) -> tuple[MemoryNode, Any]:
    node = network.addNode(host, start=False, **FAST, **options)
    peer = HTablePeer(node.bus, network.clock, [TableSpec("kv")])
    node.registerPeer(peer)
    node.stack.start()
    return node, peer.table("kv")


class HTableTests(SynchronousTestCase):
    """Replicated tables on a signed bus: members replicate, outsiders cannot write."""

    def test_outsiderCannotInjectWrites(self) -> None:
        """
        Two nodes with the secret replicate a write; a node without it,
        sending a well-formed htable set straight to them, gets 403 and
        changes nothing.
        """
        network = MemoryNetwork()
        a, kvA = addHTableNode(network, "127.0.0.1", access=signedPolicy())
        b, kvB = addHTableNode(network, "127.0.0.2", seeds=[a], access=signedPolicy())
        network.run(0.5)
        kvA.set("color", "blue")
        network.run(0.1)
        self.assertEqual(kvB.get("color"), "blue")
        outsider, _ = addHTableNode(network, "127.0.0.3", seeds=[a])
        network.run(0.5)
        body = b'{"action":2,"htname":"kv","cname":"color","type":2,"strval":"red","mode":1}'
        sends = [
            outsider.bus.send("htable", target(outsider, node), body, "application/json")
            for node in (a, b)
        ]
        network.run(0.1)
        self.assertEqual([self.successResultOf(d).code for d in sends], [403, 403])
        self.assertEqual((kvA.get("color"), kvB.get("color")), ("blue", "blue"))
        self.assertNotIn(outsider.uri, a.statuses())


class MixedBusTests(SynchronousTestCase):
    """--unsigned-from: Kamailio nodes (which cannot sign) in a signed bus."""

    def setUp(self) -> None:
        self.network = MemoryNetwork()
        exempt = parseNetworks(["127.0.0.3/32"])
        self.a = self.network.addNode("127.0.0.1", access=signedPolicy(unsignedFrom=exempt), **FAST)
        self.b = self.network.addNode(
            "127.0.0.2", seeds=[self.a], access=signedPolicy(unsignedFrom=exempt), **FAST
        )

    def test_exemptNetworkJoins(self) -> None:
        """
        A node that cannot sign (as Kamailio) joins from an exempt address:
        its unsigned requests and answers are accepted, and counted as such.
        """
        kamailio = self.network.addNode("127.0.0.3", seeds=[self.a], **FAST)
        self.network.run(5.0)
        self.assertTrue(allActive([self.a, self.b, kamailio]))
        self.assertGreater(self.a.bus.counters["in.unsigned_accepted"], 0)
        self.assertGreater(self.a.bus.counters["out.unsigned_responses_accepted"], 0)

    def test_otherAddressRefused(self) -> None:
        """The same unsigned node from an address outside the exempt networks is refused."""
        stranger = self.network.addNode("127.0.0.4", seeds=[self.a], **FAST)
        self.network.run(5.0)
        self.assertNotIn(stranger.uri, self.a.statuses())
        self.assertGreater(self.a.bus.counters["in.forbidden.unsigned"], 0)

    def test_badSignatureFromExemptRefused(self) -> None:
        """Exemption covers unsigned requests only: a wrong signature is refused from anywhere."""
        liar = MemoryNetwork().addNode(
            "127.0.0.3", start=False, access=AccessPolicy(secret=OTHER_SECRET)
        )
        request = liar.bus.buildRequest("app", target(liar, self.a), b"x", "text/plain", 1)
        self.assertEqual(answer(self.a, request, "127.0.0.3").code, 403)
        self.assertEqual(self.a.bus.counters["in.forbidden.bad_signature"], 1)


class WireTests(SynchronousTestCase):
    """Without a secret, nothing changes on the wire toward Kamailio."""

    def test_noOptionsSameBytes(self) -> None:
        """
        With the default policy, and with network and known-node rules
        (which add nothing to the wire), our join request is byte for byte
        Kamailio 5.6.3's captured one given the same identifiers.
        """
        captured = parseMessage(KAMAILIO_JOIN)
        assert isinstance(captured, Request)
        for access in (
            AccessPolicy(),
            AccessPolicy(allowNetworks=parseNetworks(["127.0.0.0/8"]), knownNodesOnly=True),
        ):
            node = MemoryNetwork().addNode(
                "127.0.0.1", 15061, userAgent="kamailio-dmq-interop", start=False, access=access
            )
            seed = Node.fromURI(captured.uri)
            request = node.bus.buildRequest(
                "notification_peer", seed, node.bus.nodeList.body(), "text/plain", 2
            )
            headers = (
                request.headers.replacing("From", captured.headers.get("From") or "")
                .replacing("Call-ID", captured.headers.get("Call-ID") or "")
                .prepending("Via", captured.headers.get("Via") or "")
            )
            self.assertEqual(request.withHeaders(headers).toBytes(), KAMAILIO_JOIN)

    def test_signedAddsOneLineAtTheEnd(self) -> None:
        """With a secret, the same request gains exactly one header line, after Kamailio's."""
        captured = parseMessage(KAMAILIO_JOIN)
        assert isinstance(captured, Request)
        node = MemoryNetwork().addNode(
            "127.0.0.1", 15061, userAgent="kamailio-dmq-interop", start=False,
            access=signedPolicy(),
        )  # fmt: skip
        request = node.bus.buildRequest(
            "notification_peer", Node.fromURI(captured.uri), node.bus.nodeList.body(),
            "text/plain", 2,
        )  # fmt: skip
        auth = request.headers.get(AUTH_HEADER) or ""
        headers = (
            request.headers.replacing("From", captured.headers.get("From") or "")
            .replacing("Call-ID", captured.headers.get("Call-ID") or "")
            .prepending("Via", captured.headers.get("Via") or "")
        )
        expected = KAMAILIO_JOIN.replace(
            b"Content-Type: text/plain\r\n\r\n",
            b"Content-Type: text/plain\r\n" + f"{AUTH_HEADER}: {auth}\r\n\r\n".encode(),
        )
        self.assertEqual(request.withHeaders(headers).toBytes(), expected)


class GuardUnitTests(SynchronousTestCase):
    """The guard's own pieces."""

    def test_unknownSourceHost(self) -> None:
        """A source that is not an IP literal is in no network (refused, not an error)."""
        from collections import Counter

        from twisted.internet.task import Clock

        guard = Guard(AccessPolicy(allowNetworks=parseNetworks(["0.0.0.0/0"])), Clock(), Counter())
        node = MemoryNetwork().addNode("127.0.0.1", start=False)
        request = node.bus.buildRequest("app", node.bus.localNode, b"", "text/plain", 1)
        self.assertIsNotNone(guard.admit(request, origin("not-an-ip")).refusal)
        self.assertIsNone(guard.admit(request, origin("192.0.2.1")).refusal)

    def test_tlsOnlyReadsTheOrigin(self) -> None:
        """The guard takes the transport from the request's origin: only tls passes."""
        from collections import Counter

        from twisted.internet.task import Clock

        counters: Counter[str] = Counter()
        guard = Guard(AccessPolicy(tlsOnly=True), Clock(), counters)
        node = MemoryNetwork().addNode("127.0.0.1", start=False)
        request = node.bus.buildRequest("app", node.bus.localNode, b"", "text/plain", 1)
        for transport in ("udp", "tcp"):
            refusal = guard.admit(request, Origin(Address(transport, "127.0.0.1", 5061))).refusal
            self.assertIs(refusal, FORBIDDEN_NOT_TLS)
        self.assertIs(guard.admit(request, None).refusal, FORBIDDEN_NOT_TLS)
        self.assertIsNone(guard.admit(request, Origin(Address("tls", "127.0.0.1", 5061))).refusal)
        self.assertEqual(counters, Counter({"in.forbidden.not_tls": 3}))
