"""
Hostile input thrown at a live node.

Every test here runs the real stack of one node (transports, transactions,
the bus, the notification peer and the htable peer) on a
L{dmq_bus.testing.MemoryNetwork} and feeds it bytes an attacker or a broken
peer could send: straight into its UDP protocol, and into TCP connections
made of L{StringTransport}s. After every example nothing may have escaped
or been logged as a failure, and the node must still answer a valid KDMQ.

Each named limit of the README's limits table has a test at its edge here
or in the module named next to it:

  - UDP message (65,535 bytes): L{EdgeTests.test_datagramAtUDPLimit}
    (test_transport tests the mechanism with a lowered limit);
  - TCP message (1 MiB): L{EdgeTests.test_streamMessageAtLimit}
    (test_transport.test_tooLargeRequest with a lowered limit);
  - header fields per message (256): L{EdgeTests.test_headerCountAtLimit}
    (test_parser tests the parser alone);
  - open server transactions: L{FloodTests}
    (test_transaction.test_serverLimit at the layer);
  - open client transactions: L{FloodTests}
    (test_transaction.test_limitFailsFast at the layer);
  - TCP connections: L{TCPAbuseTests.test_connectionLimit}
    (test_transport.ConnectionLimitTests at the layer);
  - nodes in the list: L{EdgeTests.test_maxNodesFromTheWire}
    (test_nodelist.test_maxNodes on the list alone);
  - node-list line (512 bytes): L{EdgeTests.test_nodeListLineAtLimit};
  - keys per table, key or value size: test_htable.test_maxKeys and
    test_htable.test_maxValueBytes.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Callable, Sequence
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from dmq_bus.bus.dispatch import BusConfig
from dmq_bus.bus.nodelist import MAX_LINE_LENGTH
from dmq_bus.bus.values import DMQMessage, PeerResponse
from dmq_bus.interfaces import IDMQPeer
from dmq_bus.peers.htable import HTableLimits, HTablePeer, TableSpec
from dmq_bus.service import NodeConfig, NodeStack
from dmq_bus.sip import parser
from dmq_bus.sip.parser import MAX_HEADERS
from dmq_bus.sip.transaction import TransactionLimits
from dmq_bus.sip.transport import SIPStreamProtocol, TransportLimits
from dmq_bus.sip.uri import SIPURI
from dmq_bus.testing import Endpoint, MemoryDatagramTransport, MemoryNetwork, MemoryNode
from tests.strategies import HEADER_NAMES

LOCAL: Endpoint = ("127.0.0.1", 5060)
HOSTILE: Endpoint = ("127.0.0.9", 5555)

DEFAULT_TRANSACTION_LIMITS = TransactionLimits()
DEFAULT_TRANSPORT_LIMITS = TransportLimits()
DEFAULT_HTABLE_LIMITS = HTableLimits()

SET_BODY = b'{"action":2,"htname":"kv","cname":"health","type":2,"strval":"ok","mode":0}'

_branches = itertools.count()


def freshBranch(prefix: str = "h") -> str:
    """
    A branch no other request of this module uses, always as long for a
    given prefix (so that generated inputs keep their lengths from run to run).
    """
    return f"z9hG4bK{prefix}{next(_branches):010d}"


def kdmq(
    channel: str = "htable",
    body: bytes = SET_BODY,
    *,
    branch: str | None = None,
    transport: str = "UDP",
    source: Endpoint = HOSTILE,
    extra: Sequence[str] = (),
    contentLength: str | None = None,
    contentType: str = "application/json",
    maxForwards: int = 1,
) -> bytes:
    """A KDMQ request in Kamailio 5.6.3's header order, as a hostile peer would send it."""
    host, port = source
    branch = branch or freshBranch()
    length = str(len(body)) if contentLength is None else contentLength
    lines = [
        f"KDMQ sip:{channel}@127.0.0.1:5060 SIP/2.0",
        f"Via: SIP/2.0/{transport} {host}:{port};branch={branch}",
        f"To: <sip:{channel}@127.0.0.1:5060>",
        f"From: <sip:{channel}@{host}:{port}>;tag={branch}-t",
        "CSeq: 10 KDMQ",
        f"Call-ID: {branch}@{host}",
        f"Content-Length: {length}",
        "User-Agent: kamailio (5.6.3 (x86_64/linux))",
        f"Max-Forwards: {maxForwards}",
        f"Content-Type: {contentType}",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body


def statusOf(response: bytes) -> int:
    """The status code of a serialized response."""
    return int(response.split(b" ", 2)[1])


_BRANCH = re.compile(rb"branch=([^;,\r\n]+)")


def branchOf(message: bytes) -> bytes | None:
    """The branch of the top Via of a serialized message."""
    found = _BRANCH.search(message)
    return found.group(1) if found else None


class RecordingNetwork(MemoryNetwork):
    """
    A memory network with one node on it that keeps every datagram the
    node sends (to the hostile peer or to nodes it was told about) instead
    of delivering it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[Endpoint, bytes]] = []

    def deliver(self, source: Endpoint, destination: Endpoint, packet: bytes) -> None:
        self.sent.append((destination, packet))


@implementer(IDMQPeer)
class SilentPeer:
    """A peer on channel C{silent} that never answers."""

    channel = "silent"
    description = "never answers"

    def __init__(self) -> None:
        self.waiting: list[Deferred[PeerResponse]] = []

    def messageReceived(self, message: DMQMessage) -> Deferred[PeerResponse]:
        d: Deferred[PeerResponse] = Deferred()
        self.waiting.append(d)
        return d

    def busJoined(self) -> None:
        pass


class LiveNode:
    """
    One node with the htable peer (table C{kv}) and a silent peer, on a
    L{RecordingNetwork}, with the given limits.
    """

    def __init__(
        self,
        *,
        transactionLimits: TransactionLimits = DEFAULT_TRANSACTION_LIMITS,
        transportLimits: TransportLimits = DEFAULT_TRANSPORT_LIMITS,
        htableLimits: HTableLimits = DEFAULT_HTABLE_LIMITS,
        maxNodes: int = 1024,
    ) -> None:
        self.network = RecordingNetwork()
        self.clock = self.network.clock
        config = NodeConfig(
            bus=BusConfig(serverAddress=SIPURI(host=LOCAL[0], port=LOCAL[1]), maxNodes=maxNodes),
            transactionLimits=transactionLimits,
            transportLimits=transportLimits,
        )
        self.stack = NodeStack(config, self.clock, None)
        protocol = self.stack.transport.datagramProtocol()
        protocol.makeConnection(MemoryDatagramTransport(self.network, LOCAL))  # type: ignore[arg-type]
        self.node = MemoryNode(self.network, self.stack, LOCAL, protocol)
        self.htable = HTablePeer(self.stack.bus, self.clock, [TableSpec("kv")], limits=htableLimits)
        self.silent = SilentPeer()
        self.node.registerPeer(self.htable)
        self.node.registerPeer(self.silent)
        self.stack.start()
        self._ports = itertools.count(20000)

    @property
    def counters(self) -> dict[str, int]:
        """Every counter of the node."""
        return self.stack.stats()

    def udp(self, data: bytes, source: Endpoint = HOSTILE) -> list[bytes]:
        """Feed one datagram; the datagrams the node sent meanwhile."""
        before = len(self.network.sent)
        self.node.protocol.datagramReceived(data, source)
        return [packet for _, packet in self.network.sent[before:]]

    def connect(self) -> tuple[SIPStreamProtocol | None, StringTransport]:
        """Open an inbound TCP connection from the hostile host (None: refused)."""
        port = next(self._ports)
        address = IPv4Address("TCP", HOSTILE[0], port)
        transport = StringTransport(peerAddress=address)
        proto = self.stack.transport.streamFactory().buildProtocol(address)
        if proto is not None:
            proto.makeConnection(transport)
        return proto, transport

    @staticmethod
    def disconnect(proto: SIPStreamProtocol) -> None:
        """The peer closes the connection (or it was closed and is now gone)."""
        proto.connectionLost(Failure(ConnectionDone()))

    def answerOverUDP(self) -> int:
        """Send a valid htable set over UDP; the status of its one answer."""
        branch = freshBranch("ok")
        sent = self.udp(kdmq(branch=branch))
        answers = [p for p in sent if p.startswith(b"SIP/2.0 ") and branchOf(p) == branch.encode()]
        if len(answers) != 1:
            raise AssertionError(f"expected one answer to a valid KDMQ, got {sent!r}")
        return statusOf(answers[0])

    def answerOverTCP(self) -> int:
        """Send a valid htable set on a new TCP connection; the status of its answer."""
        proto, transport = self.connect()
        if proto is None:
            raise AssertionError("a new TCP connection was refused")
        try:
            proto.dataReceived(kdmq(transport="TCP"))
            answer = transport.value()
            if not answer.startswith(b"SIP/2.0 "):
                raise AssertionError(f"no answer on TCP: {answer!r}")
            return statusOf(answer)
        finally:
            self.disconnect(proto)


class HostileTestCase(SynchronousTestCase):
    """A live node per test, and a check that nothing failed inside it."""

    def setUp(self) -> None:
        self.live = LiveNode()
        self.failures: list[LogEvent] = []

        @implementer(ILogObserver)
        def observe(event: LogEvent) -> None:
            failure = event.get("log_failure")
            if failure is None:
                return
            self.failures.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def assertStillServing(self, tcp: bool = False) -> None:
        """Nothing failed inside the node, and it answers a valid KDMQ 200."""
        if self.failures:
            failure = self.failures[0]["log_failure"]
            raise AssertionError(f"the node logged a failure: {failure.getTraceback()}")
        counters = self.live.counters
        for name in ("receiver_errors", "errors.internal"):
            self.assertEqual(counters.get(name, 0), 0, name)
        self.assertEqual(self.live.answerOverUDP(), 200)
        if tcp:
            self.assertEqual(self.live.answerOverTCP(), 200)

    def feedUDP(self, data: bytes) -> None:
        """Throw one datagram at the node; it must still serve afterwards."""
        self.live.udp(data)
        self.assertStillServing()

    def feedTCP(self, chunks: Sequence[bytes]) -> None:
        """Throw chunks at one TCP connection; the node must still serve afterwards."""
        proto, _ = self.live.connect()
        assert proto is not None
        for chunk in chunks:
            proto.dataReceived(chunk)
        self.live.disconnect(proto)
        self.assertStillServing(tcp=True)


# ---------------------------------------------------------------------------
# Strategies of hostile input


NASTY_TEXT = [
    "",
    " ",
    "\t",
    ";",
    ",",
    ":",
    "<",
    ">",
    '"',
    "\\",
    "@",
    "[",
    "]",
    "[::1",
    "sip:",
    "sip:@",
    "sip::5060",
    "sip:127.0.0.1:99999",
    "sip:127.0.0.1:-1",
    "sip:[::1]:5060;transport=udp",
    "sips:a@b;c=d?e=f",
    "SIP/2.0/UDP",
    "SIP/2.0/UDP 127.0.0.9:5555;branch=",
    "SIP/2.0/UDP [::1;branch=z9hG4bKx",
    "SIP/2.0/FOO 127.0.0.9:0;rport=99999999999;received=:::",
    "z9hG4bK",
    "0",
    "-1",
    "4294967296",
    "99999999999999999999999",
    "1e9",
    "0x10",
    "\x00",
    "\x00\x01\x02",
    "\u00e9\u4e2d\U0001f600",
    "\udcff",
    "a" * 600,
    ";" * 300,
    "<" * 200,
    "KDMQ",
    "10 KDMQ KDMQ",
    "abc KDMQ",
]
"""Header values, URIs and words that break naive parsers."""

nastyText = st.sampled_from(NASTY_TEXT) | st.text(max_size=40)

_VALID_LINES = kdmq(branch="z9hG4bKbase").split(b"\r\n\r\n", 1)[0].decode().split("\r\n")


@st.composite
def brokenHeaders(draw: st.DrawFn) -> bytes:
    """A KDMQ request whose header values (and sometimes names) are replaced by nasty ones."""
    lines = list(_VALID_LINES)
    for _ in range(draw(st.integers(1, 4))):
        index = draw(st.integers(1, len(lines) - 1))
        name = lines[index].split(":", 1)[0]
        if draw(st.integers(0, 4)) == 0:
            name = draw(st.sampled_from(HEADER_NAMES) | nastyText)
        separator = draw(st.sampled_from([": ", ":", " : ", "", "\r\n ", "\n"]))
        lines[index] = f"{name}{separator}{draw(nastyText)}"
    if draw(st.booleans()):
        lines.insert(
            draw(st.integers(1, len(lines))),
            f"{draw(st.sampled_from(HEADER_NAMES))}: {draw(nastyText)}",
        )
    head = "\r\n".join(lines).encode("utf-8", "surrogateescape")
    return head + b"\r\n\r\n" + SET_BODY


@st.composite
def badURIs(draw: st.DrawFn) -> bytes:
    """A KDMQ request whose Request-URI, Via sent-by, From or To is broken."""
    lines = list(_VALID_LINES)
    bad = draw(nastyText)
    where = draw(st.sampled_from(["request", "via", "from", "to"]))
    if where == "request":
        lines[0] = f"{draw(st.sampled_from(['KDMQ', 'OPTIONS', 'kdmq', 'X']))} {bad} SIP/2.0"
    elif where == "via":
        lines[1] = f"Via: SIP/2.0/UDP {bad};branch={freshBranch('u')}"
    elif where == "from":
        lines[3] = f"From: <{bad}>;tag=x"
    else:
        lines[2] = f"To: {bad}"
    head = "\r\n".join(lines).encode("utf-8", "surrogateescape")
    return head + b"\r\n\r\n" + SET_BODY


@st.composite
def mutatedRequests(draw: st.DrawFn) -> bytes:
    """A valid request cut, spliced, duplicated or bit-flipped in a few places."""
    data = bytearray(
        kdmq(
            draw(st.sampled_from(["htable", "notification_peer", "silent", "nope", ""])),
            draw(st.sampled_from([SET_BODY, b"sip:127.0.0.5:5060;status=active\r\n", b""])),
        )
    )
    for _ in range(draw(st.integers(1, 5))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["cut", "insert", "delete", "flip", "repeat"]))
        if kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(max_size=20) | st.sampled_from([b"\r\n", b"\n", b":"]))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 30))]
        elif kind == "flip" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif kind == "repeat":
            data[at:at] = data[max(0, at - 40) : at]
    return bytes(data)


def _nodeLine(draw: st.DrawFn) -> bytes:
    host = draw(
        st.sampled_from(["127.0.0.5", "127.0.0.1", "10.1.2.3", "[::1]", "example.com", "", "::"])
        | st.ip_addresses(v=4).map(str)
    )
    port = draw(st.sampled_from(["5060", "5555", "0", "65536", "-1", "x", "99999999999"]))
    params = draw(
        st.lists(
            st.sampled_from(
                [
                    "status=active",
                    "status=pending",
                    "status=disabled",
                    "status=timeout",
                    "status=not_active",
                    "status=sleepy",
                    "status=",
                    "transport=tcp",
                    "transport=sctp",
                    "transport=udp",
                    "x=" + "y" * 600,
                    "",
                ]
            ),
            max_size=3,
        )
    )
    line = f"sip:{host}:{port}" + "".join(f";{p}" for p in params)
    if draw(st.integers(0, 5)) == 0:
        line = draw(nastyText)
    return line.encode("utf-8", "surrogateescape")


@st.composite
def badNodeLists(draw: st.DrawFn) -> bytes:
    """A notification request whose node list mixes good, bad and hostile lines."""
    lines = [_nodeLine(draw) for _ in range(draw(st.integers(0, 12)))]
    end = draw(st.sampled_from([b"\r\n", b"\n", b"\r", b"\x00"]))
    body = end.join(lines) + draw(st.sampled_from([b"", end]))
    if draw(st.integers(0, 6)) == 0:
        body += draw(st.binary(max_size=50))
    return kdmq(
        "notification_peer",
        body,
        contentType="text/plain",
        maxForwards=draw(st.sampled_from([0, 1, 2, 70])),
    )


jsonScalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
jsonValues = st.recursive(
    jsonScalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)

_ACTION_FIELDS = ["action", "htname", "cname", "type", "strval", "intval", "mode"]
_WRONG_VALUES = [
    None,
    True,
    -1,
    2**31,
    -(2**31) - 1,
    2**64,
    10**400,
    1e308,
    -0.0,
    "2",
    "kv",
    "",
    [],
    {},
    [2],
    {"a": 1},
]


@st.composite
def badHTableBodies(draw: st.DrawFn) -> bytes:
    """An htable request with a broken, deep, huge or mistyped JSON body."""
    kind = draw(st.sampled_from(["random", "deep", "huge", "typed", "empty", "cells", "raw"]))
    body: bytes
    if kind == "random":
        body = json.dumps(draw(jsonValues)).encode()
    elif kind == "deep":
        depth = draw(st.sampled_from([100, 1000, 5000, 20000]))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
        body = opener * depth + closer * draw(st.sampled_from([0, depth]))
        if draw(st.booleans()):
            body = b'{"cells":' + body + b"}"
    elif kind == "huge":
        digits = draw(st.sampled_from([20, 400, 4300, 5000, 30000]))
        field = draw(st.sampled_from(["action", "type", "intval", "mode"]))
        number = draw(st.sampled_from(["9", "-9", "1e", "0."]))
        value = number + "9" * digits if not number.endswith("e") else "1e" + "9" * digits
        body = (
            '{"action":2,"htname":"kv","cname":"big","type":0,"intval":1,"mode":0}'.replace(
                f'"{field}":', f'"{field}":{value},"_{field}":'
            )
        ).encode()
        body = re.sub(rb',"_[a-z]+":[^,}]+', b"", body)
    elif kind == "typed":
        fields: dict[str, Any] = {
            "action": 2,
            "htname": "kv",
            "cname": "typed",
            "type": 2,
            "strval": "v",
            "mode": 0,
        }
        for _ in range(draw(st.integers(1, 3))):
            fields[draw(st.sampled_from(_ACTION_FIELDS))] = draw(
                st.sampled_from(_WRONG_VALUES) | jsonValues
            )
        if draw(st.booleans()):
            fields["action"] = draw(st.integers(-3, 9))
        body = json.dumps(fields).encode()
    elif kind == "empty":
        body = draw(st.sampled_from([b"{}", b"[]", b"", b"null", b" ", b"{", b"\x00", b'""']))
    elif kind == "cells":
        cells = draw(
            st.lists(
                st.fixed_dictionaries(
                    {},
                    optional={
                        f: st.sampled_from(_WRONG_VALUES) | jsonScalars
                        for f in ["htname", "cname", "type", "strval", "intval", "expire"]
                    },
                )
                | jsonValues,
                max_size=5,
            )
        )
        body = json.dumps({"cells": cells}).encode()
    else:
        body = draw(st.binary(max_size=200))
    return kdmq("htable", body)


@st.composite
def hugeContentLengths(draw: st.DrawFn) -> bytes:
    """A request whose Content-Length disagrees wildly with its body."""
    value = draw(
        st.sampled_from(
            ["999999999", "1000000000", "4294967296", "-1", "1e3", "0x10", "", " ", "1 2", "٣"]
        )
        | st.integers(0, 10**12).map(str)
    )
    name = draw(st.sampled_from(["Content-Length", "l", "content-length", "CONTENT-LENGTH"]))
    data = kdmq(contentLength=value)
    return data.replace(b"Content-Length:", name.encode() + b":", 1)


@st.composite
def manyHeaders(draw: st.DrawFn) -> bytes:
    """A request with hundreds of header fields, around the limit."""
    count = draw(st.integers(MAX_HEADERS - 20, MAX_HEADERS + 40))
    name = draw(st.sampled_from(["X-Pad", "Via", "v", "Content-Length", "Route"]))
    value = draw(
        st.sampled_from(["1", "SIP/2.0/UDP 127.0.0.9:5555;branch=z9hG4bKpad", "", "x" * 100])
    )
    extra = [f"{name}: {value}"] * max(0, count - 10)
    return kdmq(extra=extra)


@st.composite
def garbageAfterValid(draw: st.DrawFn) -> bytes:
    """A valid request followed by garbage (or by another request, or a keep-alive)."""
    tail = draw(
        st.binary(max_size=300)
        | st.sampled_from([b"\r\n\r\n", b"\r\n", kdmq(), b"SIP/2.0 200 OK\r\n\r\n"])
    )
    return kdmq() + tail


randomBytes = st.binary(max_size=2000) | st.binary(min_size=1, max_size=64).map(lambda b: b * 100)
"""Random bytes, and random bytes repeated into bigger blobs."""

hostileMessages = st.one_of(
    randomBytes,
    brokenHeaders(),
    badURIs(),
    mutatedRequests(),
    badNodeLists(),
    badHTableBodies(),
    hugeContentLengths(),
    manyHeaders(),
    garbageAfterValid(),
)
"""Any of the above."""


def _tcp(data: bytes) -> bytes:
    return data.replace(b"SIP/2.0/UDP", b"SIP/2.0/TCP")


@st.composite
def tcpStreams(draw: st.DrawFn) -> list[bytes]:
    """A few hostile messages (on TCP Vias) sent back to back, cut at random points."""
    stream = b"".join(_tcp(m) for m in draw(st.lists(hostileMessages, min_size=1, max_size=3)))
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    return [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]


# ---------------------------------------------------------------------------
# The tests


class UDPHostileTests(HostileTestCase):
    """Hostile datagrams: the node drops or answers them, and keeps serving."""

    @given(randomBytes)
    def test_randomBytes(self, data: bytes) -> None:
        """Random bytes in a datagram are dropped; the node keeps answering."""
        self.feedUDP(data)

    @given(mutatedRequests())
    def test_truncatedAndMangled(self, data: bytes) -> None:
        """A request cut short, spliced or bit-flipped never breaks the node."""
        self.feedUDP(data)

    @given(brokenHeaders())
    def test_brokenHeaders(self, data: bytes) -> None:
        """Malformed or nonsensical header lines and values never break the node."""
        self.feedUDP(data)

    @given(badURIs())
    def test_badURIs(self, data: bytes) -> None:
        """Broken Request-URIs, Via sent-bys, From and To URIs never break the node."""
        self.feedUDP(data)

    @settings(max_examples=100)
    @given(badNodeLists())
    def test_badNodeLists(self, data: bytes) -> None:
        """
        A notification with bad, hostile or oversized node-list lines never
        breaks the node (Kamailio 5.6.3 locks up on the first bad line).
        """
        self.feedUDP(data)
        self.assertLessEqual(len(self.live.stack.bus.nodeList), 1024)

    @given(badHTableBodies())
    def test_badHTableJSON(self, data: bytes) -> None:
        """
        Deeply nested, huge-number, mistyped or empty JSON to the htable
        channel is answered (400/500) or applied, never fatal (C{{}} crashes
        Kamailio 5.6.3).
        """
        self.feedUDP(data)

    @given(hugeContentLengths())
    def test_hugeContentLength(self, data: bytes) -> None:
        """A Content-Length far beyond (or not even) a number never makes the node wait or fail."""
        self.feedUDP(data)

    @given(manyHeaders())
    def test_manyHeaders(self, data: bytes) -> None:
        """Hundreds of header fields, around the 256 limit, never break the node."""
        self.feedUDP(data)

    @given(garbageAfterValid())
    def test_garbageAfterValidRequest(self, data: bytes) -> None:
        """Bytes after a complete request in a datagram are ignored; the request is answered."""
        sent = self.live.udp(data)
        self.assertTrue(any(p.startswith(b"SIP/2.0 200 ") for p in sent), sent)
        self.assertStillServing()

    @settings(max_examples=10)
    @given(st.lists(hostileMessages, min_size=50, max_size=100))
    def test_mixedBursts(self, data: list[bytes]) -> None:
        """A burst of every kind of hostile datagram in a row leaves the node serving."""
        for datagram in data:
            self.live.udp(datagram)
        self.assertStillServing()


class TCPHostileTests(HostileTestCase):
    """Hostile bytes on TCP connections: at worst the connection is closed."""

    @settings(max_examples=300)
    @given(tcpStreams())
    def test_hostileStreams(self, chunks: list[bytes]) -> None:
        """
        Hostile messages sent back to back on one connection, in arbitrary
        chunks, close at most that connection; the node keeps serving UDP
        and new connections.
        """
        self.feedTCP(chunks)

    @given(randomBytes, st.integers(1, 50))
    def test_randomBytesTrickled(self, data: bytes, size: int) -> None:
        """Random bytes trickled in small chunks never break the node."""
        self.feedTCP([data[i : i + size] for i in range(0, len(data), size)])

    @given(garbageAfterValid())
    def test_garbageAfterValidRequest(self, data: bytes) -> None:
        """A request followed by garbage on a connection is answered before the garbage counts."""
        proto, transport = self.live.connect()
        assert proto is not None
        proto.dataReceived(_tcp(data))
        self.assertTrue(transport.value().startswith(b"SIP/2.0 200 "), transport.value()[:100])
        self.live.disconnect(proto)
        self.assertStillServing(tcp=True)


class TCPAbuseTests(HostileTestCase):
    """Connections that hog the node: half-open, stalled, too many."""

    def test_stalledConnectionsClosedWhenIdle(self) -> None:
        """
        Connections that send half a header block and stall are closed after
        the idle timeout; the node serves meanwhile and after.
        """
        stalled = []
        for i in range(50):
            proto, transport = self.live.connect()
            assert proto is not None
            proto.dataReceived(_tcp(kdmq())[: 10 + i])
            stalled.append((proto, transport))
        self.assertStillServing(tcp=True)
        self.live.clock.advance(TransportLimits().tcpIdleTimeout)
        self.assertTrue(all(t.disconnecting for _, t in stalled))
        self.assertEqual(self.live.counters["tcp.idle_closed"], 50)
        self.assertStillServing(tcp=True)

    def test_connectionLimit(self) -> None:
        """
        With maxConnections open, the next inbound connection is refused and
        counted; one below it is accepted; UDP is served throughout, and a
        closed connection frees its slot.
        """
        self.live = LiveNode(transportLimits=TransportLimits(maxConnections=5))
        protos = []
        for _ in range(4):
            proto, _ = self.live.connect()
            assert proto is not None
            protos.append(proto)
        fifth, _ = self.live.connect()
        self.assertIsNotNone(fifth)
        refused, _ = self.live.connect()
        self.assertIsNone(refused)
        self.assertEqual(self.live.counters["tcp.connections_refused_limit"], 1)
        self.assertEqual(self.live.answerOverUDP(), 200)
        self.live.disconnect(protos[0])
        self.assertEqual(self.live.answerOverTCP(), 200)

    def test_headerBlockNeverEnding(self) -> None:
        """A header block that never ends closes its connection at 64 KiB, not later."""
        proto, transport = self.live.connect()
        assert proto is not None
        proto.dataReceived(b"KDMQ sip:htable@127.0.0.1:5060 SIP/2.0\r\n")
        for _ in range(100):
            if transport.disconnecting:
                break
            proto.dataReceived(b"X-Pad: " + b"y" * 1000 + b"\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.live.counters["tcp.headers_too_long"], 1)
        self.assertStillServing(tcp=True)


def _padToSize(size: int, transport: str = "UDP") -> bytes:
    """A valid htable set of exactly C{size} bytes (the value is padded)."""
    branch = freshBranch("pad")
    pad = 0
    # the Content-Length digits grow with the body
    while True:
        body = SET_BODY.replace(b'"ok"', b'"' + b"p" * pad + b'"')
        data = kdmq(transport=transport, body=body, branch=branch)
        if len(data) == size:
            return data
        pad += size - len(data)


class EdgeTests(HostileTestCase):
    """The named limits, just below and at them, on the live node."""

    def test_datagramAtUDPLimit(self) -> None:
        """
        A 65,535-byte datagram (the UDP limit) is accepted and its value
        stored; one byte more is dropped without an answer and counted.
        """
        atLimit = _padToSize(65535)
        self.assertEqual(len(atLimit), 65535)
        [answer] = self.live.udp(atLimit)
        self.assertEqual(statusOf(answer), 200)
        table = self.live.htable.table("kv")
        assert table is not None
        value = table.get("health")
        assert isinstance(value, str)
        self.assertEqual((set(value), len(value) > 65000), ({"p"}, True))
        self.assertEqual(self.live.udp(_padToSize(65536)), [])
        self.assertEqual(self.live.counters["oversize"], 1)
        self.assertStillServing()

    def test_streamMessageAtLimit(self) -> None:
        """
        On TCP a message of exactly 1 MiB is accepted; one byte more is
        answered 413 as soon as its headers are in, and the connection closed.
        """
        limit = TransportLimits().maxStreamMessageSize
        proto, transport = self.live.connect()
        assert proto is not None
        proto.dataReceived(_padToSize(limit, "TCP"))
        self.assertEqual(statusOf(transport.value()), 200)
        transport.clear()
        tooBig = _padToSize(limit + 1, "TCP")
        proto.dataReceived(tooBig[: tooBig.index(b"\r\n\r\n") + 4])
        self.assertEqual(statusOf(transport.value()), 413)
        self.assertTrue(transport.disconnecting)
        self.live.disconnect(proto)
        self.assertStillServing(tcp=True)

    def test_headerCountAtLimit(self) -> None:
        """
        A request with 256 header fields is answered 200; with 257 it is
        dropped, unanswered, and counted as a parse error (README).
        """
        base = len(_VALID_LINES) - 1
        atLimit = kdmq(extra=["X-Pad: 1"] * (MAX_HEADERS - base))
        [answer] = self.live.udp(atLimit)
        self.assertEqual(statusOf(answer), 200)
        before = self.live.counters.get("udp.parse_errors", 0)
        self.assertEqual(self.live.udp(kdmq(extra=["X-Pad: 1"] * (MAX_HEADERS - base + 1))), [])
        self.assertEqual(self.live.counters["udp.parse_errors"], before + 1)
        self.assertStillServing()

    def test_nodeListLineAtLimit(self) -> None:
        """
        A node-list line of 512 bytes is read (the node is added); one of
        513 bytes is skipped and counted, and the rest of the list still counts.
        """

        def line(port: int, length: int) -> bytes:
            text = f"sip:127.0.0.7:{port};status=active;x="
            return (text + "y" * (length - len(text))).encode()

        body = line(5071, MAX_LINE_LENGTH) + b"\r\n" + line(5072, MAX_LINE_LENGTH + 1) + b"\r\n"
        body += b"sip:127.0.0.7:5073;status=active\r\n"
        [answer] = [p for p in self.live.udp(kdmq("notification_peer", body)) if p[:4] == b"SIP/"]
        self.assertEqual(statusOf(answer), 200)
        ports = {n.uri.port for n in self.live.stack.bus.nodes()}
        self.assertEqual(ports & {5071, 5072, 5073}, {5071, 5073})
        self.assertEqual(self.live.counters["nodelist.bad_lines"], 1)
        self.assertStillServing()

    def test_maxNodesFromTheWire(self) -> None:
        """
        A notification naming more new nodes than the list holds fills it
        exactly to maxNodes and counts the rest; known nodes still update.
        """
        self.live = LiveNode(maxNodes=5)
        body = b"".join(b"sip:127.0.0.7:%d;status=pending\r\n" % p for p in range(6000, 6010))
        self.live.udp(kdmq("notification_peer", body))
        self.assertEqual(len(self.live.stack.bus.nodeList), 5)
        self.assertEqual(self.live.counters["nodes.rejected_limit"], 6)
        self.live.udp(kdmq("notification_peer", b"sip:127.0.0.7:6000;status=disabled\r\n"))
        statuses = {n.uri.port: n.status.word for n in self.live.stack.bus.nodes()}
        self.assertEqual(statuses[6000], "disabled")
        self.assertStillServing()


class FloodTests(HostileTestCase):
    """Floods of new transactions: memory stays bounded by the limits."""

    def test_fiftyThousandDistinctRequests(self) -> None:
        """
        After 50,000 distinct garbage-but-parseable requests (fresh branches,
        random channels and header names, sync requests and notifications
        that make the node send), every table of open and completed
        transactions, and every cache fed by the wire, is within its limit;
        past the limits new requests get 503 and sends fail fast; once the
        waiting requests time out the node serves normally.
        """
        limits = TransactionLimits(
            maxClientTransactions=50, maxServerTransactions=100, maxCompletedTransactions=1000
        )
        self.live = LiveNode(
            transactionLimits=limits, htableLimits=HTableLimits(maxKeys=100), maxNodes=16
        )
        live = self.live
        rng = random.Random(4)
        transactions = live.stack.transactions
        common: list[Callable[[int], bytes]] = [
            lambda i: kdmq(
                body=b'{"action":2,"htname":"kv","cname":"k%d","type":0,"intval":%d}' % (i, i)
            ),
            lambda i: kdmq(f"ch{i}", b"x"),
            lambda i: kdmq(extra=[f"X-{i}-{rng.random()}: {i}"]),
            lambda i: kdmq().replace(b"KDMQ sip:", b"OPTIONS sip:", 1),
            lambda i: kdmq().replace(b"KDMQ sip:", b"M%d sip:" % i, 1),
        ]
        serverAtLimit = False
        for i in range(50_000):
            if i % 90 == 0:  # ~111 per 10,000: the limit is reached late in each window
                data = kdmq("silent", b"x")
            elif i % 97 == 0:  # a stranger's sync request: the node sends chunks to it
                data = kdmq(body=b'{"action":1}', source=(f"127.1.{i % 250}.1", i % 60000 + 1))
            elif i % 31 == 0:  # a new node, rebroadcast: the node sends notifications
                data = kdmq(
                    "notification_peer",
                    b"sip:127.2.%d.%d:5060;status=active\r\n" % (i % 250, i % 251),
                    contentType="text/plain",
                    maxForwards=2,
                )
            else:
                data = rng.choice(common)(i)
            source = (f"127.3.{i % 256}.{(i // 256) % 256}", 1024 + i % 50000)
            live.udp(data, source)
            if transactions.openServerTransactions == limits.maxServerTransactions:
                serverAtLimit = True
            self.assertLessEqual(transactions.openServerTransactions, limits.maxServerTransactions)
            self.assertLessEqual(transactions.openClientTransactions, limits.maxClientTransactions)
            if i % 10_000 == 9_999:
                # the waiting requests time out (500), completed ones expire
                live.clock.advance(limits.serverResponseTimeout + 1)
            elif i % 1000 == 0:
                live.clock.advance(0.01)
        self.assertTrue(serverAtLimit)
        self.assertLessEqual(
            transactions.completedServerTransactions, limits.maxCompletedTransactions
        )
        self.assertLessEqual(
            transactions.completedClientTransactions, limits.maxCompletedTransactions
        )
        counters = live.counters
        self.assertGreater(counters["server.rejected_limit"], 0)
        self.assertGreater(counters["client.rejected_limit"], 0)
        self.assertGreater(counters["server.completed_evicted"], 0)
        self.assertLessEqual(len(live.stack.bus.nodeList), 16)
        self.assertLessEqual(len(live.htable.table("kv").items()), 100)  # type: ignore[union-attr]
        self.assertLessEqual(len(live.stack.transport._udpOrigins), 4096)
        self.assertLessEqual(len(parser._KNOWN_NAMES), parser._KNOWN_NAMES_LIMIT)
        self.assertLessEqual(len(parser._KNOWN_LINES), parser._KNOWN_LINES_LIMIT)
        # at the limit of waiting requests a valid one gets 503...
        while transactions.openServerTransactions < limits.maxServerTransactions:
            live.udp(kdmq("silent", b"x"))
        self.assertEqual(live.answerOverUDP(), 503)
        # ...until they time out (answered 500) and free their slots
        live.clock.advance(limits.serverResponseTimeout + 1)
        self.assertEqual(transactions.openServerTransactions, 0)
        self.assertStillServing()

    def test_serverLimitEdge(self) -> None:
        """
        With maxServerTransactions − 1 requests waiting for a peer, one more
        is accepted; at the limit the next request is answered 503 without
        reaching any peer.
        """
        limits = TransactionLimits(maxServerTransactions=10)
        self.live = LiveNode(transactionLimits=limits)
        for _ in range(limits.maxServerTransactions - 1):
            self.assertEqual(self.live.udp(kdmq("silent", b"x")), [])
        self.assertEqual(self.live.udp(kdmq("silent", b"x")), [])
        self.assertEqual(len(self.live.silent.waiting), 10)
        self.assertEqual(self.live.answerOverUDP(), 503)
        self.assertEqual(len(self.live.silent.waiting), 10)
        self.live.silent.waiting[0].callback(PeerResponse(200, "OK"))
        self.assertStillServing()


class ReflectionTests(HostileTestCase):
    """The node must not be usable to flood a third party."""

    def test_syncRequestNotReflectedToThirdParty(self) -> None:
        """
        A stranger's htable sync request whose From names some other host
        does not make the node send its table to that host.
        """
        table = self.live.htable.table("kv")
        assert table is not None
        for i in range(2000):
            table.set(f"key-{i:05d}", "v" * 40)
        victim = ("198.51.100.7", 9999)
        request = kdmq(body=b'{"action":1}').replace(
            b"From: <sip:htable@127.0.0.9:5555>", b"From: <sip:htable@198.51.100.7:9999>"
        )
        self.live.network.sent.clear()
        self.live.udp(request)
        self.live.clock.pump([1.0] * 60)
        reflected = sum(len(p) for d, p in self.live.network.sent if d == victim)
        self.assertEqual(reflected, 0, f"{reflected} bytes sent to {victim} for {len(request)}")


class LogTests(HostileTestCase):
    """What hostile input makes the node log."""

    def test_hostileTextLoggable(self) -> None:
        """
        Log lines about hostile input can be written to a UTF-8 log file:
        bytes that are not UTF-8 (kept as lone surrogates) never reach a
        log event as they are (a text log file would raise on them).
        """
        events: list[LogEvent] = []

        @implementer(ILogObserver)
        def observe(event: LogEvent) -> None:
            events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        self.live.udp(kdmq().replace(b"SIP/2.0/UDP 127.0.0.9", b"SIP/2.0/\xff 127.0.0.9"))
        self.live.udp(kdmq().replace(b"\r\nCSeq", b"\r\nX\xff: 1\r\nCSeq"))
        for event in events:
            text = formatEvent(event)
            self.assertEqual(text.encode("utf-8", "replace").decode("utf-8"), text)
