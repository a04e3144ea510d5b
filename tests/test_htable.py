"""
The htable peer: its table specs, its JSON codec against Kamailio 5.6.3's
captured bytes, its answers to good and hostile bodies, its limits, and
replicated tables on an in-memory bus of several nodes (writes, expiry,
removal, sync on join in chunks).
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from dmq_bus.bus.values import (
    BroadcastResult,
    Delivery,
    DMQMessage,
    MembershipEvent,
    Node,
    NodeStatus,
    PeerResponse,
)
from dmq_bus.interfaces import IDMQBus, IDMQPeer, IDMQPeerFactory, IHashTable, IHashTables
from dmq_bus.peers.htable import (
    INT32_MAX,
    INT32_MIN,
    Action,
    Cell,
    HashTable,
    HTableLimits,
    HTablePeer,
    HTablePeerFactory,
    MalformedMessage,
    SyncCells,
    TableChange,
    TableFull,
    TableSpec,
    UnsafePattern,
    checkPattern,
    chunkCells,
    decodeMessage,
    encodeCell,
    encodeCells,
    encodeDelete,
    encodeRemove,
    encodeSet,
    encodeSetExpire,
    encodeSyncRequest,
    jsonString,
    parseTableSpec,
    parseTableSpecs,
)
from dmq_bus.sip.address import Address, Origin
from dmq_bus.sip.message import Request, Response
from dmq_bus.sip.parser import parseMessage
from dmq_bus.sip.uri import SIPURI
from dmq_bus.testing import MemoryNetwork, MemoryNode
from tests.fixtures import captureFiles, loadCapture

# -- helpers ----------------------------------------------------------------

PREFIXES = (b'{"action":', b'{"cells":')
"""What every body we emit starts with (5.6.3 crashes on a body without a first member)."""


def captureBody(name: str) -> bytes:
    """The body of one captured message."""
    return parseMessage(loadCapture(name)).body


def capturedRequest(name: str) -> Request:
    message = parseMessage(loadCapture(name))
    assert isinstance(message, Request)
    return message


STRANGER = capturedRequest("e-errors-073")
"""A captured htable KDMQ from a fake node (127.0.0.1:16001) Kamailio did not know."""


def message(body: bytes, request: Request = STRANGER, sender: Node | None = None) -> DMQMessage:
    """A DMQMessage for C{body} as the bus would hand it to the peer."""
    return DMQMessage(
        channel="htable",
        body=body,
        contentType="application/json",
        sender=sender,
        maxForwards=1,
        origin=Origin(Address("udp", "127.0.0.1", 16001)),
        request=request,
    )


def nodeAt(uri: str) -> Node:
    return Node.fromURI(SIPURI.parse(uri), NodeStatus.ACTIVE)


@implementer(IDMQBus)
class RecordingBus:
    """
    A bus that records what the peer sends. C{send}s answer 200 at once
    unless C{autoAnswer} is False (then their Deferreds wait in C{pending}).
    """

    def __init__(self, autoAnswer: bool = True) -> None:
        self.localNode = nodeAt("sip:127.0.0.1:5060")
        self.clock = Clock()
        self.autoAnswer = autoAnswer
        self.sent: list[tuple[Node, bytes, str, int]] = []
        self.broadcasts: list[tuple[bytes, str, int]] = []
        self.pending: list[tuple[Node, Deferred[Delivery]]] = []
        self.broadcastResult = BroadcastResult()

    def registerPeer(self, peer: IDMQPeer) -> None:
        pass

    def unregisterPeer(self, channel: str) -> None:
        pass

    def nodes(self) -> Sequence[Node]:
        return [self.localNode]

    def findNode(self, uri: str) -> Node | None:
        return None

    def send(
        self,
        channel: str,
        node: Node,
        body: bytes,
        contentType: str,
        maxForwards: int = 1,
        timeout: float | None = None,
    ) -> Deferred[Delivery]:
        assert channel == "htable"
        self.sent.append((node, body, contentType, maxForwards))
        if self.autoAnswer:
            return defer.succeed(Delivery(node, 200, "OK"))
        d: Deferred[Delivery] = Deferred()
        self.pending.append((node, d))
        return d

    def broadcast(
        self,
        channel: str,
        body: bytes,
        contentType: str,
        exclude: Node | None = None,
        maxForwards: int = 1,
        timeout: float | None = None,
    ) -> Deferred[BroadcastResult]:
        assert channel == "htable"
        self.broadcasts.append((body, contentType, maxForwards))
        return defer.succeed(self.broadcastResult)

    def addMembershipObserver(
        self, observer: Callable[[MembershipEvent], None]
    ) -> Callable[[], None]:
        return lambda: None

    def bodies(self) -> list[bytes]:
        """Every body sent or broadcast, in order of kind."""
        return [b for b, _, _ in self.broadcasts] + [b for _, b, _, _ in self.sent]


def localPeer(
    specs: Sequence[TableSpec] = (TableSpec("kv"),),
    clock: Clock | None = None,
    bus: RecordingBus | None = None,
    **kwargs: Any,
) -> tuple[HTablePeer, RecordingBus, Clock]:
    clock = clock if clock is not None else Clock()
    bus = bus if bus is not None else RecordingBus()
    return HTablePeer(bus, clock, specs, **kwargs), bus, clock


def kv(peer: HTablePeer, name: str = "kv") -> HashTable:
    table = peer.table(name)
    assert table is not None
    return table


REQUESTER = Node.fromURI(SIPURI.parse("sip:127.0.0.1:16001"), NodeStatus.ACTIVE)
"""A known node at the host the test messages come from (see L{message})."""


def answer(peer: HTablePeer, body: bytes, **kwargs: Any) -> PeerResponse:
    result = peer.messageReceived(message(body, **kwargs))
    assert isinstance(result, PeerResponse)
    return result


# -- strategies ---------------------------------------------------------------

_textChars = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")
nonUTF8 = (
    st.binary(max_size=24)
    .filter(lambda b: b"\x00" not in b)
    .map(lambda b: b.decode("utf-8", "surrogateescape"))
)
"""Strings standing for arbitrary bytes (invalid UTF-8 kept with surrogateescape)."""

texts = st.text(_textChars, max_size=24) | nonUTF8 | st.sampled_from(["", '"', "\\", "/", "\x7f"])
ints = st.integers(INT32_MIN, INT32_MAX)
values = texts | ints
tableNames = st.sampled_from(["kv", "t", "cache.v2", "a-b_c"])
patterns = st.sampled_from(["^ab", "a.c", "x$", "[0-9]+", "^$", "é", "(ab){2}", ""]) | st.text(
    st.sampled_from("abcxyz"), max_size=5
)


# ---------------------------------------------------------------------------


class InterfaceTests(SynchronousTestCase):
    """The peer, its tables and its factory provide what they claim."""

    def test_verify(self) -> None:
        """HTablePeer is an IDMQPeer and IHashTables, its tables IHashTable, the factory a plugin."""
        peer, _, _ = localPeer()
        verifyObject(IDMQPeer, peer)
        verifyObject(IHashTables, peer)
        verifyObject(IHashTable, kv(peer))
        verifyObject(IDMQPeerFactory, HTablePeerFactory())
        self.assertEqual(peer.channel, "htable")
        self.assertTrue(peer.description)

    def test_tables(self) -> None:
        """Tables are found by name and listed in declaration order."""
        peer, _, _ = localPeer([TableSpec("b"), TableSpec("a", autoexpire=5)])
        self.assertEqual([t.name for t in peer.tables()], ["b", "a"])
        self.assertEqual(kv(peer, "a").defaultExpire, 5)
        self.assertIsNone(peer.table("nope"))

    def test_duplicateTableRefused(self) -> None:
        """Declaring one table twice is a configuration error."""
        self.assertRaises(ValueError, localPeer, [TableSpec("kv"), TableSpec("kv")])

    def test_factory(self) -> None:
        """--peer htable=kv,cache=autoexpire=60 makes a peer with both tables."""
        peer = HTablePeerFactory().makePeer(RecordingBus(), "kv,cache=autoexpire=60")
        assert isinstance(peer, HTablePeer)
        self.assertEqual([t.name for t in peer.tables()], ["kv", "cache"])
        self.assertEqual(kv(peer, "cache").defaultExpire, 60)
        self.assertEqual(HTablePeerFactory.name, "htable")

    def test_factoryBadOptions(self) -> None:
        """Empty options, a bad spec or a repeated table are usage errors (ValueError)."""
        factory = HTablePeerFactory()
        for options in ("", ",", "kv=colour=red", "kv,kv", "=x"):
            self.assertRaises(ValueError, factory.makePeer, RecordingBus(), options)


class TableSpecTests(SynchronousTestCase):
    """Table specs use Kamailio's option syntax."""

    def test_nameOnly(self) -> None:
        """A bare name is a replicated table without autoexpire."""
        self.assertEqual(parseTableSpec("kv"), TableSpec("kv", 0.0, True))

    def test_kamailioOptions(self) -> None:
        """autoexpire, dmqreplicate and size (ignored) are read, with a trailing ';'."""
        self.assertEqual(
            parseTableSpec("cache=autoexpire=60;dmqreplicate=1;size=10;"),
            TableSpec("cache", 60.0, True),
        )
        self.assertEqual(parseTableSpec("local=dmqreplicate=0"), TableSpec("local", 0.0, False))

    def test_kamailioArrow(self) -> None:
        """Kamailio's own 'name=>options' form is accepted too."""
        self.assertEqual(
            parseTableSpec("kv=>size=10;autoexpire=0;dmqreplicate=1;"), TableSpec("kv")
        )

    def test_errors(self) -> None:
        """Unknown options, bad values and bad names give a ValueError naming the problem."""
        with self.assertRaises(ValueError) as caught:
            parseTableSpec("kv=initval=3")
        self.assertIn("unknown option 'initval'", str(caught.exception))
        for bad in (
            "",
            "=autoexpire=1",
            "k v",
            "kv=autoexpire=-1",
            "kv=autoexpire=soon",
            "kv=autoexpire=nan",
            "kv=dmqreplicate=2",
            "kv=size=big",
            "kv=autoexpire",
        ):
            self.assertRaises(ValueError, parseTableSpec, bad)

    def test_specs(self) -> None:
        """Comma-separated specs give one TableSpec each."""
        self.assertEqual(
            parseTableSpecs("kv, cache=autoexpire=1.5"),
            [TableSpec("kv"), TableSpec("cache", 1.5)],
        )


class EncoderCaptureTests(SynchronousTestCase):
    """Our encoder writes exactly the bytes Kamailio 5.6.3 wrote on the wire."""

    def test_setString(self) -> None:
        """A string set equals Kamailio's action-2 body (c-htable-047)."""
        self.assertEqual(encodeSet("kv", "color", "blue"), captureBody("c-htable-047"))
        self.assertEqual(encodeSet("kv", "viasip", "hello world"), captureBody("c-htable-056"))

    def test_setInt(self) -> None:
        """An integer set equals Kamailio's (c-htable-051)."""
        self.assertEqual(encodeSet("kv", "count", 42), captureBody("c-htable-051"))

    def test_setExpire(self) -> None:
        """A set-expire equals Kamailio's action-3 body (c-htable-069)."""
        self.assertEqual(encodeSetExpire("kv", "color", 3600), captureBody("c-htable-069"))

    def test_delete(self) -> None:
        """A delete equals Kamailio's action-4 body (c-htable-065)."""
        self.assertEqual(encodeDelete("kv", "count"), captureBody("c-htable-065"))

    def test_syncRequest(self) -> None:
        """The sync request equals Kamailio's (a-join-003)."""
        self.assertEqual(encodeSyncRequest(), captureBody("a-join-003"))

    def test_syncCells(self) -> None:
        """Sync chunks, empty and full, equal Kamailio's (a-join-006, e-errors-134)."""
        self.assertEqual(encodeCells([]), captureBody("a-join-006"))
        cells = [
            encodeCell("kv", "viasip", "hello world", 0),
            encodeCell("kv", "from_stranger", "accepted", 0),
            encodeCell("kv", "no_ct", "z", 0),
            encodeCell("kv", "color", "blue", 0),
            encodeCell("kv", "ct_plain", 7, 0),
        ]
        self.assertEqual(encodeCells(cells), captureBody("e-errors-134"))
        self.assertEqual(
            encodeCells(
                [
                    encodeCell("kv", "fromF", "vF", 0),
                    encodeCell("kv", "k3", "val3", 20),
                    encodeCell("kv", "k1", "hello", 0),
                ]
            ),
            captureBody("join-ping-htable-sync-udp-048"),
        )

    def test_remove(self) -> None:
        """Remove bodies follow the spec's key order (no cname; mode 1 = values)."""
        self.assertEqual(
            encodeRemove("kv", "^ab.*"),
            b'{"action":5,"htname":"kv","type":2,"strval":"^ab.*","mode":0}',
        )
        self.assertEqual(
            encodeRemove("kv", "ab", prefix=True, byValue=True),
            b'{"action":6,"htname":"kv","type":2,"strval":"ab","mode":1}',
        )

    def test_stringEscapes(self) -> None:
        """
        Strings are escaped as srjson does: quote, backslash and control
        characters; '/', DEL and bytes >= 0x80 raw; cut at the first NUL.
        """
        self.assertEqual(jsonString('a"b\\c'), b'"a\\"b\\\\c"')
        self.assertEqual(jsonString("\n\r\t\b\f"), b'"\\n\\r\\t\\b\\f"')
        self.assertEqual(jsonString("\x01\x1f"), b'"\\u0001\\u001f"')
        self.assertEqual(jsonString("a/b\x7f"), b'"a/b\x7f"')
        self.assertEqual(jsonString("é€"), '"é€"'.encode())
        self.assertEqual(jsonString(b"\xff\xfe".decode("utf-8", "surrogateescape")), b'"\xff\xfe"')
        self.assertEqual(jsonString("ab\x00cd"), b'"ab"')


class DecoderTests(SynchronousTestCase):
    """Decoding what Kamailio sends, and what nobody should."""

    def htableRequests(self) -> list[tuple[str, Request]]:
        found = []
        for path in captureFiles():
            parsed = parseMessage(path.read_bytes())
            if isinstance(parsed, Request) and parsed.uri.user == "htable":
                found.append((path.name, parsed))
        return found

    def test_everyCapturedBodyDecodes(self) -> None:
        """
        Every captured htable body decodes, except the ones Kamailio
        answered 400 (or crashed on), which are L{MalformedMessage}.
        """
        malformed = {
            "e-errors-085.sip",  # truncated JSON
            "e-errors-091.sip",  # empty body
            "e-errors-097.sip",  # unknown key
            "join-ping-htable-sync-udp-045.sip",  # unknown key
            "join-ping-htable-sync-udp-051.sip",  # empty body
            "e-errors-472.sip",  # [1,2]: crashes 5.6.3
            "e-errors-483.sip",  # {}: crashes 5.6.3
            "fake-node-exchanges-udp-041.sip",  # {}
        }
        requests = self.htableRequests()
        self.assertGreater(len(requests), 40)
        for name, request in requests:
            if name in malformed:
                self.assertRaises(MalformedMessage, decodeMessage, request.body)
            else:
                decodeMessage(request.body)

    def test_capturedValues(self) -> None:
        """Captured actions and cells decode to the values Kamailio meant."""
        self.assertEqual(
            decodeMessage(captureBody("c-htable-051")), Action(2, "kv", "count", 42, 1)
        )
        self.assertEqual(
            decodeMessage(captureBody("c-htable-069")), Action(3, "kv", "color", 3600, 0)
        )
        self.assertEqual(decodeMessage(captureBody("c-htable-065")), Action(4, "kv", "count"))
        chunk = decodeMessage(captureBody("join-ping-htable-sync-udp-048"))
        assert isinstance(chunk, SyncCells)
        self.assertEqual(chunk.cells[1], Cell("kv", "k3", "val3", 20))

    def test_lenient(self) -> None:
        """Duplicate keys (last wins), raw non-UTF-8 bytes, raw control characters, \\u escapes."""
        self.assertEqual(
            decodeMessage(
                b'{"action":2,"htname":"kv","cname":"a","cname":"b","type":0,"intval":1}'
            ),
            Action(2, "kv", "b", 1, 0),
        )
        decoded = decodeMessage(
            b'{"action":2,"htname":"kv","cname":"\xff\n","type":2,"strval":"\\u00e9"}'
        )
        assert isinstance(decoded, Action)
        self.assertEqual(decoded.cname, "\udcff\n")
        self.assertEqual(decoded.value, "é")

    def test_cellsKeepUnknownKeysOut(self) -> None:
        """Cells ignore unknown keys; unusable cells are counted, not fatal."""
        chunk = decodeMessage(
            b'{"cells":[{"htname":"kv","cname":"a","type":2,"strval":"x","expire":0,"last_modified":5},'
            b'{"cname":"b","type":2,"strval":"y"},7,{"htname":"kv","cname":"c","type":0}]}'
        )
        self.assertEqual(chunk, SyncCells((Cell("kv", "a", "x", 0),), invalid=3))

    def test_loneSurrogateEscape(self) -> None:
        """A \\ud800 escape is kept as bytes, so the value can still be encoded again."""
        decoded = decodeMessage(b'{"action":2,"htname":"kv","cname":"\\ud800","type":0,"intval":1}')
        assert isinstance(decoded, Action) and decoded.cname is not None
        jsonString(decoded.cname)

    @given(tableNames, texts, values)
    def test_setRoundTrip(self, table: str, key: str, value: str | int) -> None:
        """Any set, control characters and non-UTF-8 bytes included, decodes to itself."""
        self.assertEqual(
            decodeMessage(encodeSet(table, key, value)), Action(2, table, key, value, 1)
        )

    @given(tableNames, texts, st.integers(0, INT32_MAX))
    def test_otherActionsRoundTrip(self, table: str, key: str, seconds: int) -> None:
        """Set-expire, delete and removes decode to themselves."""
        self.assertEqual(
            decodeMessage(encodeSetExpire(table, key, seconds)), Action(3, table, key, seconds, 0)
        )
        self.assertEqual(decodeMessage(encodeDelete(table, key)), Action(4, table, key))
        self.assertEqual(
            decodeMessage(encodeRemove(table, key, byValue=True)), Action(5, table, None, key, 1)
        )
        self.assertEqual(
            decodeMessage(encodeRemove(table, key, prefix=True)), Action(6, table, None, key, 0)
        )

    @given(st.lists(st.tuples(tableNames, texts, values, st.integers(0, 2**40)), max_size=20))
    def test_cellsRoundTrip(self, cells: list[tuple[str, str, str | int, int]]) -> None:
        """Any sync chunk decodes to its cells in order."""
        body = encodeCells(encodeCell(*cell) for cell in cells)
        self.assertEqual(decodeMessage(body), SyncCells(tuple(Cell(*cell) for cell in cells)))

    @given(texts)
    def test_stringsAreJSON(self, text: str) -> None:
        """What we write is JSON a standard parser reads back (when it is UTF-8)."""
        raw = jsonString(text)
        try:
            decodedText = raw.decode("utf-8")
        except UnicodeDecodeError:
            return
        self.assertEqual(json.loads(decodedText), text)


class EverythingWeSendTests(SynchronousTestCase):
    """No body we can emit could crash a Kamailio 5.6.3 receiver."""

    @given(
        st.lists(
            st.one_of(
                st.tuples(st.just("set"), texts, values, st.none() | st.integers(0, 100)),
                st.tuples(st.just("setExpire"), texts, st.integers(0, 100)),
                st.tuples(st.just("delete"), texts),
                st.tuples(st.just("remove"), patterns, st.booleans(), st.booleans()),
                st.tuples(st.just("join")),
                st.tuples(st.just("syncAnswer")),
            ),
            max_size=25,
        ),
        st.integers(40, 400),
    )
    def test_everyBodyStartsWithAFirstMember(self, operations: list[Any], chunkSize: int) -> None:
        """
        Whatever the operations (any keys and values, removes, join sync
        requests, sync answers in any chunk size), every body starts with
        {"action": or {"cells": and decodes back.
        """
        peer, bus, _ = localPeer(chunkSize=chunkSize)
        table = kv(peer)
        for op in operations:
            if op[0] == "set":
                table.set(op[1], op[2], op[3])
            elif op[0] == "setExpire":
                table.setExpire(op[1], op[2])
            elif op[0] == "delete":
                table.delete(op[1])
            elif op[0] == "remove":
                table.removeMatching(op[1], byValue=op[2], prefix=op[3])
            elif op[0] == "join":
                peer.busJoined()
            else:
                self.assertEqual(answer(peer, encodeSyncRequest()).code, 200)
        for body in bus.bodies():
            self.assertTrue(body.startswith(PREFIXES), body)
            decodeMessage(body)
        for _, _body, contentType, maxForwards in bus.sent:
            self.assertEqual((contentType, maxForwards), ("application/json", 1))


class AnswerTests(SynchronousTestCase):
    """The peer answers every body like Kamailio 5.6.3, and never raises."""

    def test_capturedAnswers(self) -> None:
        """
        For every captured htable request Kamailio answered, we answer the
        same code (200, 400 for bad JSON, unknown key or no body, 500 for
        an unknown table or action).
        """
        answers: dict[str, int] = {}
        requests = []
        for path in captureFiles():
            parsed = parseMessage(path.read_bytes())
            callID = parsed.headers.get("call-id") or ""
            if isinstance(parsed, Response):
                answers[callID] = parsed.code
            elif parsed.uri.user == "htable":
                requests.append((path.name, callID, parsed))
        checked = set()
        for name, callID, request in requests:
            if callID not in answers:
                continue
            peer, _, _ = localPeer()
            got = answer(peer, request.body, request=request)
            self.assertEqual(got.code, answers[callID], name)
            self.assertEqual(got.body, b"")
            checked.add(answers[callID])
        self.assertEqual(checked, {200, 400, 500})

    def test_errorCases(self) -> None:
        """The spec's e-errors cases: unknown key 400, unknown table 500, unknown action 500, empty 400."""
        peer, _, _ = localPeer()
        cases = [
            (captureBody("e-errors-097"), 400, "Bad Request"),
            (captureBody("e-errors-103"), 500, "Server Internal Error"),
            (captureBody("e-errors-109"), 500, "Server Internal Error"),
            (b"", 400, "Bad Request"),
            (b'{"action":0}', 500, "Server Internal Error"),
            (b'{"htname":"kv"}', 500, "Server Internal Error"),
        ]
        for body, code, reason in cases:
            got = answer(peer, body)
            self.assertEqual((got.code, got.reason), (code, reason), body)

    def test_hostile(self) -> None:
        """
        Garbage, {}, arrays, 10,000 nested brackets, huge numbers and wrong
        types get 400 or 500, never an exception, and change nothing.
        """
        peer, _, _ = localPeer()
        cases = {
            b"\xff\xfe\x00garbage": 400,
            b"{}": 400,
            b"[]": 400,
            b"[1,2]": 400,
            b"null": 400,
            b'"action"': 400,
            b"12": 400,
            b"[" * 10_000: 400,
            b'{"action":' * 10_000: 400,
            b'{"action":2,"htname":"kv","cname":"x","type":0,"intval":' + b"9" * 5000 + b"}": 400,
            b'{"action":1': 400,
            b'{"cells":5}': 400,
            b'{"action":2,"htname":"kv","cname":"x","type":0,"intval":1e999}': 500,
            b'{"action":2,"htname":"kv","cname":"x","type":0,"intval":4294967296}': 500,
            b'{"action":2,"htname":"kv","cname":"x","type":0,"intval":"1"}': 500,
            b'{"action":2,"htname":"kv","cname":"x","type":2,"strval":5}': 500,
            b'{"action":2,"htname":"kv","cname":"x","type":"2","strval":"v"}': 500,
            b'{"action":2,"htname":"kv","cname":7,"type":2,"strval":"v"}': 500,
            b'{"action":2,"htname":"kv","type":2,"strval":"v"}': 500,
            b'{"action":3,"htname":"kv","cname":"x","type":2,"strval":"v"}': 500,
            b'{"action":5,"htname":"kv","type":0,"intval":1}': 500,
            b'{"action":"2","htname":"kv"}': 500,
            b'{"action":true,"htname":"kv"}': 500,
            b'{"action":-1,"htname":"kv"}': 500,
            b'{"action":7,"htname":"kv","type":2,"strval":"x","mode":0}': 500,
            b'{"action":2,"htname":["kv"],"cname":"x","type":2,"strval":"v"}': 500,
            b'{"cells":[1,[],{"htname":{}},{"htname":"kv","cname":"x","type":0,"intval":1e999}]}': 200,
        }
        for body, code in cases.items():
            self.assertEqual(answer(peer, body).code, code, body[:80])
        self.assertEqual(len(kv(peer)), 0)

    @given(st.binary(max_size=200))
    def test_anyBytes(self, body: bytes) -> None:
        """Any bytes at all are answered 200, 400 or 500."""
        peer, _, _ = localPeer()
        self.assertIn(answer(peer, body).code, (200, 400, 500))

    @given(
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
            lambda inner: (
                st.lists(inner, max_size=4)
                | st.dictionaries(
                    st.sampled_from(
                        [
                            "action",
                            "htname",
                            "cname",
                            "type",
                            "strval",
                            "intval",
                            "mode",
                            "cells",
                            "x",
                        ]
                    ),
                    inner,
                    max_size=6,
                )
            ),
            max_leaves=20,
        )
    )
    def test_anyJSON(self, value: object) -> None:
        """Any JSON value with our keys in any shape is answered 200, 400 or 500."""
        peer, _, _ = localPeer()
        self.assertIn(answer(peer, json.dumps(value).encode()).code, (200, 400, 500))

    def test_answersHaveNoBody(self) -> None:
        """Every answer, 200 included, has no body (as Kamailio's)."""
        peer, _, _ = localPeer()
        for body in (encodeSet("kv", "a", "b"), encodeSyncRequest(), encodeCells([]), b"{}"):
            got = answer(peer, body)
            self.assertEqual((got.body, got.contentType), (b"", None))

    def test_nonReplicatedTableRefusesRemoteWrites(self) -> None:
        """A table declared dmqreplicate=0 answers remote writes 500 and skips synced cells."""
        peer, bus, _ = localPeer([TableSpec("local", replicate=False)])
        self.assertEqual(answer(peer, encodeSet("local", "a", "b")).code, 500)
        self.assertEqual(answer(peer, encodeCells([encodeCell("local", "a", "b", 0)])).code, 200)
        self.assertEqual(len(kv(peer, "local")), 0)
        kv(peer, "local").set("a", "b")
        self.assertEqual(bus.broadcasts, [])

    def test_unexpectedErrorIs500(self) -> None:
        """A bug inside the peer becomes a logged 500, not an exception."""
        peer, _, _ = localPeer()

        def broken(change: TableChange) -> None:
            raise ZeroDivisionError()

        kv(peer).addObserver(broken)
        peer._handle = lambda message: 1 / 0  # type: ignore[method-assign, assignment, return-value]
        self.assertEqual(answer(peer, encodeSet("kv", "a", "b")).code, 500)
        self.flushLoggedErrors(ZeroDivisionError)


class LocalTableTests(SynchronousTestCase):
    """A table's own API, its limits and its expiry, with a recording bus."""

    def test_setGetReplicates(self) -> None:
        """A set is readable at once and broadcast once as action 2, Max-Forwards 1."""
        peer, bus, _ = localPeer()
        kv(peer).set("color", "blue")
        self.assertEqual(kv(peer).get("color"), "blue")
        self.assertEqual(bus.broadcasts, [(captureBody("c-htable-047"), "application/json", 1)])

    def test_setWithExpire(self) -> None:
        """set(expire=) sends action 2 then action 3, as Kamailio's setx does."""
        peer, bus, _ = localPeer()
        kv(peer).set("color", "blue", expire=3600)
        self.assertEqual(
            [b for b, _, _ in bus.broadcasts],
            [captureBody("c-htable-047"), captureBody("c-htable-069")],
        )
        self.assertEqual(kv(peer).items(), [("color", "blue", 3600.0)])

    def test_fractionalExpireRoundsUp(self) -> None:
        """A lifetime of 0.2 s goes on the wire as 1 s, not 0 (which means never)."""
        peer, bus, _ = localPeer()
        kv(peer).set("k", 1, expire=0.2)
        self.assertEqual(decodeMessage(bus.broadcasts[-1][0]), Action(3, "kv", "k", 1, 0))

    def test_int32(self) -> None:
        """Ints must fit 32 bits signed, as Kamailio's; bools and other types are refused."""
        peer, bus, _ = localPeer()
        table = kv(peer)
        table.set("lo", INT32_MIN)
        table.set("hi", INT32_MAX)
        self.assertRaises(ValueError, table.set, "x", INT32_MAX + 1)
        self.assertRaises(ValueError, table.set, "x", INT32_MIN - 1)
        self.assertRaises(TypeError, table.set, "x", True)
        self.assertRaises(TypeError, table.set, "x", 1.5)
        self.assertRaises(ValueError, table.set, "x", 1, expire=2**31)
        self.assertRaises(ValueError, table.set, "x", 1, expire=-1)
        self.assertIsNone(table.get("x"))
        self.assertEqual(len(bus.broadcasts), 2)

    def test_nulRefused(self) -> None:
        """A NUL in a key or value is refused: Kamailio's strings would end there."""
        table = kv(localPeer()[0])
        self.assertRaises(ValueError, table.set, "a\x00b", "v")
        self.assertRaises(ValueError, table.set, "k", "v\x00")

    def test_deleteAbsentSendsNothing(self) -> None:
        """Deleting or re-timing an absent key returns False and sends nothing."""
        peer, bus, _ = localPeer()
        self.assertFalse(kv(peer).delete("nope"))
        self.assertFalse(kv(peer).setExpire("nope", 5))
        self.assertEqual(bus.broadcasts, [])

    def test_maxValueBytes(self) -> None:
        """A value of maxValueBytes is replicated; one byte more raises ValueError and changes nothing."""
        peer, bus, _ = localPeer()
        table = kv(peer)
        table.set("k", "x" * 60_000)
        self.assertEqual(len(bus.broadcasts), 1)
        with self.assertRaises(ValueError) as caught:
            table.set("k", "é" * 30_000 + "x")
        self.assertIn("maxValueBytes", str(caught.exception))
        self.assertEqual(table.get("k"), "x" * 60_000)
        self.assertRaises(ValueError, table.set, "k" * 60_001, "v")

    def test_maxBodyBytes(self) -> None:
        """A value that escaping makes bigger than maxBodyBytes is refused before anything changes."""
        peer, bus, _ = localPeer()
        with self.assertRaises(ValueError) as caught:
            kv(peer).set("k", "\n" * 32_000)
        self.assertIn("maxBodyBytes", str(caught.exception))
        self.assertIsNone(kv(peer).get("k"))
        self.assertEqual(bus.broadcasts, [])

    def test_maxKeys(self) -> None:
        """
        At maxKeys a new key is refused (TableFull locally, 500 remotely, a
        synced cell skipped) while existing keys still change; an expired
        key frees its slot.
        """
        peer, _, clock = localPeer(limits=HTableLimits(maxKeys=2))
        table = kv(peer)
        table.set("a", 1)
        table.set("b", 2, expire=5)
        self.assertRaises(TableFull, table.set, "c", 3)
        table.set("a", 10)
        self.assertEqual(answer(peer, encodeSet("kv", "c", 3)).code, 500)
        self.assertEqual(answer(peer, encodeSet("kv", "a", 11)).code, 200)
        self.assertEqual(answer(peer, encodeCells([encodeCell("kv", "c", 3, 0)])).code, 200)
        self.assertEqual(peer.counters["htable.sync.cells_skipped"], 1)
        self.assertEqual(peer.counters["htable.in.table_full"], 1)
        self.assertIsNone(table.get("c"))
        clock.advance(5)
        table.set("c", 3)
        self.assertEqual(sorted(k for k, _, _ in table.items()), ["a", "c"])

    def test_regexLimits(self) -> None:
        """
        Remove by regex refuses long, risky (nested repetition,
        back-reference) and invalid patterns: ValueError here, 500 from the
        bus, and nothing is removed.
        """
        peer, bus, _ = localPeer(limits=HTableLimits(maxPatternLength=10))
        table = kv(peer)
        table.set("aaaa", "v")
        for pattern in ("a" * 11, "(a+)+$", "(a|aa)*", r"(a)\1", "("):
            self.assertRaises(UnsafePattern, table.removeMatching, pattern)
            self.assertEqual(answer(peer, encodeRemove("kv", pattern)).code, 500, pattern)
        self.assertEqual(table.get("aaaa"), "v")
        self.assertEqual(peer.counters["htable.in.bad_pattern"], 5)
        self.assertEqual(len(bus.broadcasts), 1)
        self.assertEqual(table.removeMatching("a" * 10, prefix=True), 0)

    def test_checkPattern(self) -> None:
        """Ordinary patterns pass the safety check; prefixes are never regexes."""
        for pattern in ("^user:", "a.c", "[0-9]+$", "(ab){2}c*", "(a|b)*", "x(?=y)"):
            self.assertIsInstance(checkPattern(pattern, 256), re.Pattern)

    def test_autoexpire(self) -> None:
        """In an autoexpire table a cell lives autoexpire seconds after its last set."""
        peer, _, clock = localPeer([TableSpec("cache", autoexpire=10)])
        table = kv(peer, "cache")
        table.set("k", "v")
        clock.advance(8)
        table.set("k", "w")
        clock.advance(8)
        self.assertEqual(table.get("k"), "w")
        clock.advance(2)
        self.assertIsNone(table.get("k"))

    def test_expiryNotifiesOnce(self) -> None:
        """The sweep removes expired cells on time and tells observers once each."""
        peer, _, clock = localPeer()
        table = kv(peer)
        changes: list[TableChange] = []
        table.addObserver(changes.append)
        table.set("k", "v", expire=5)
        table.set("j", "v", expire=3)
        table.setExpire("j", 4)
        del changes[:]
        clock.advance(4)
        self.assertEqual(changes, [TableChange("kv", "j", None, "expired", "local")])
        clock.advance(1)
        self.assertEqual(len(table), 0)
        self.assertEqual([c.key for c in changes], ["j", "k"])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_oneSweepTimer(self) -> None:
        """However many keys expire, the table keeps one DelayedCall, at the earliest expiry."""
        peer, _, clock = localPeer()
        table = kv(peer)
        for i in range(200):
            table.set(f"k{i}", i, expire=100 - (i % 50))
        calls = clock.getDelayedCalls()
        self.assertEqual(len(calls), 1)
        self.assertEqual(calls[0].getTime(), 51)
        peer.stop()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_setExpireZeroMeansForever(self) -> None:
        """setExpire(key, 0) makes a key permanent, even in an autoexpire table."""
        peer, bus, clock = localPeer([TableSpec("cache", autoexpire=1)])
        table = kv(peer, "cache")
        table.set("k", "v")
        self.assertTrue(table.setExpire("k", 0))
        clock.advance(100)
        self.assertEqual(table.get("k"), "v")
        self.assertEqual(decodeMessage(bus.broadcasts[-1][0]), Action(3, "cache", "k", 0, 0))

    def test_removeMatching(self) -> None:
        """Remove by key regex, key prefix, value regex and value prefix; ints never match values."""
        peer, bus, _ = localPeer()
        table = kv(peer)
        for key, value in (("user:1", "alice"), ("user:2", "bob"), ("sess:1", "alice"), ("n", 7)):
            table.set(key, value)
        self.assertEqual(table.removeMatching("^user:"), 2)
        self.assertEqual(table.removeMatching("^7$", byValue=True), 0)
        self.assertEqual(table.removeMatching("ali", byValue=True, prefix=True), 1)
        self.assertEqual(table.removeMatching("n", prefix=True), 1)
        self.assertEqual(len(table), 0)
        self.assertEqual(
            [b[:12] for b, _, _ in bus.broadcasts[4:]],
            [b'{"action":5,', b'{"action":5,', b'{"action":6,', b'{"action":6,'],
        )

    def test_replicationFailuresCounted(self) -> None:
        """A node refusing or missing a replicated write is counted and logged, never raised."""
        peer, bus, _ = localPeer()
        other = nodeAt("sip:127.0.0.1:5070")
        from twisted.python.failure import Failure

        bus.broadcastResult = BroadcastResult(
            (Delivery(other, 500, "Server Internal Error"),),
            ((other, Failure(RuntimeError("timeout"))),),
        )
        kv(peer).set("k", "v")
        self.assertEqual(peer.counters["htable.replication.failures"], 2)

    def test_remoteSetExpire(self) -> None:
        """A received set-expire gives the key that many seconds; for an absent key it is a no-op."""
        peer, _, clock = localPeer()
        self.assertEqual(answer(peer, encodeSet("kv", "k", "v")).code, 200)
        self.assertEqual(answer(peer, encodeSetExpire("kv", "k", 3)).code, 200)
        self.assertEqual(answer(peer, encodeSetExpire("kv", "absent", 3)).code, 200)
        self.assertEqual(answer(peer, encodeDelete("kv", "absent")).code, 200)
        clock.advance(3)
        self.assertIsNone(kv(peer).get("k"))


class SyncAnswerTests(SynchronousTestCase):
    """Answering a sync request, with a recording bus."""

    def test_emptyTablesSendOneEmptyChunk(self) -> None:
        """With nothing to send we still send {"cells":[]}, as Kamailio does."""
        peer, bus, _ = localPeer()
        self.assertEqual(answer(peer, encodeSyncRequest(), sender=REQUESTER).code, 200)
        self.assertEqual([b for _, b, _, _ in bus.sent], [b'{"cells":[]}'])

    def test_strangerGetsNothing(self) -> None:
        """
        A sync request from a node we do not know is answered 200 but gets
        no cells: following its From-URI would let anyone reflect our whole
        table at any host, and Kamailio's broadcast would flood the bus.
        """
        peer, bus, _ = localPeer()
        kv(peer).set("k", "v")
        self.assertEqual(answer(peer, captureBody("e-errors-133")).code, 200)
        self.assertEqual(bus.sent, [])
        self.assertEqual(bus.broadcasts[1:], [])
        self.assertEqual(peer.counters["htable.sync.unknown_requester"], 1)

    def test_spoofedKnownNodeGetsNothing(self) -> None:
        """
        A sync request naming a known node in From but coming from another
        host sends nothing: the node list is not proof of who is asking.
        """
        peer, bus, _ = localPeer()
        answer(peer, encodeSyncRequest(), sender=nodeAt("sip:127.0.0.2:5060"))
        self.assertEqual(bus.sent, [])
        self.assertEqual(peer.counters["htable.sync.unknown_requester"], 1)

    def test_smallerChunksOverTCP(self) -> None:
        """
        Toward a node reached over TCP, chunks are at most streamChunkSize
        (Kamailio 5.6.3 drops TCP messages over its 16 KiB read buffer).
        """
        peer, bus, _ = localPeer()
        for i in range(2000):
            kv(peer).set(f"key{i:05}", "x" * 40)
        sender = nodeAt("sip:127.0.0.1:5099;transport=tcp")
        answer(peer, encodeSyncRequest(), sender=sender)
        sizes = [len(body) for _, body, _, _ in bus.sent]
        self.assertGreater(len(sizes), 4)
        self.assertLessEqual(max(sizes), HTableLimits().streamChunkSize)
        self.assertEqual(peer.chunkSizeFor(REQUESTER), 60_000)

    def test_knownSenderGetsChunks(self) -> None:
        """A known node's sync request is answered to that node's entry."""
        peer, bus, _ = localPeer()
        sender = nodeAt("sip:127.0.0.1:5099;transport=tcp")
        answer(peer, encodeSyncRequest(), sender=sender)
        self.assertEqual([n for n, _, _, _ in bus.sent], [sender])

    def test_chunksBeforeAnswerAndWindow(self) -> None:
        """
        The first syncWindow chunks are sent before the request is
        answered; each answered chunk lets one more go; the first failed
        chunk ends the stream (the requester is gone), and a new request
        can start a new stream afterwards.
        """
        bus = RecordingBus(autoAnswer=False)
        peer, _, _ = localPeer(bus=bus, chunkSize=200, limits=HTableLimits(syncWindow=3))
        for i in range(40):
            kv(peer).set(f"key{i:03}", f"value{i}")
        self.assertEqual(answer(peer, encodeSyncRequest(), sender=REQUESTER).code, 200)
        self.assertEqual(len(bus.sent), 3)
        node, d = bus.pending.pop(0)
        d.callback(Delivery(node, 200, "OK"))
        self.assertEqual(len(bus.sent), 4)
        node, d = bus.pending.pop(0)
        d.errback(RuntimeError("lost"))
        self.assertEqual(len(bus.sent), 4, "a failed chunk stops the stream")
        while bus.pending:
            node, d = bus.pending.pop(0)
            d.callback(Delivery(node, 200, "OK"))
        self.assertEqual(len(bus.sent), 4)
        self.assertEqual(peer.counters["htable.sync.chunk_failures"], 1)
        for _, body, _, _ in bus.sent:
            self.assertLessEqual(len(body), 200)
            self.assertIsInstance(decodeMessage(body), SyncCells)
        answer(peer, encodeSyncRequest(), sender=REQUESTER)
        self.assertEqual(len(bus.sent), 7, "the stream ended, so a new request starts one")

    def test_wholeTableWhenAllAnswered(self) -> None:
        """When every chunk is answered, all cells go, each chunk within chunkSize."""
        bus = RecordingBus(autoAnswer=False)
        peer, _, _ = localPeer(bus=bus, chunkSize=200, limits=HTableLimits(syncWindow=3))
        for i in range(40):
            kv(peer).set(f"key{i:03}", f"value{i}")
        answer(peer, encodeSyncRequest(), sender=REQUESTER)
        while bus.pending:
            node, d = bus.pending.pop(0)
            d.callback(Delivery(node, 200, "OK"))
        cells: list[Cell] = []
        for _, body, _, _ in bus.sent:
            self.assertLessEqual(len(body), 200)
            chunk = decodeMessage(body)
            assert isinstance(chunk, SyncCells)
            cells.extend(chunk.cells)
        self.assertEqual(len(cells), 40)

    def test_streamLimits(self) -> None:
        """
        A requester whose stream is still running, or a request beyond
        maxSyncStreams concurrent streams, gets 200 and nothing more.
        """
        bus = RecordingBus(autoAnswer=False)
        peer, _, _ = localPeer(bus=bus, limits=HTableLimits(syncWindow=1, maxSyncStreams=2))
        kv(peer).set("k", "v")
        first = nodeAt("sip:127.0.0.1:6001")
        second = nodeAt("sip:127.0.0.1:6002")
        third = nodeAt("sip:127.0.0.1:6003")
        for node in (first, first, second, third):
            self.assertEqual(answer(peer, encodeSyncRequest(), sender=node).code, 200)
        self.assertEqual([n for n, _, _, _ in bus.sent], [first, second])
        self.assertEqual(peer.counters["htable.sync.refused_busy"], 2)

    def test_tableChangesDuringSync(self) -> None:
        """
        Writes made while a sync is still being sent do not break it: the
        requester gets the cells that were live when it asked (later writes
        reach it by replication).
        """
        bus = RecordingBus(autoAnswer=False)
        peer, _, _ = localPeer(bus=bus, chunkSize=100, limits=HTableLimits(syncWindow=1))
        for i in range(20):
            kv(peer).set(f"k{i:02}", i)
        answer(peer, encodeSyncRequest(), sender=REQUESTER)
        for i in range(20):
            kv(peer).delete(f"k{i:02}")
            kv(peer).set(f"new{i}", i)
        while bus.pending:
            node, d = bus.pending.pop(0)
            d.callback(Delivery(node, 200, "OK"))
        keys: list[str] = []
        for _, body, _, _ in bus.sent:
            chunk = decodeMessage(body)
            assert isinstance(chunk, SyncCells)
            keys.extend(c.cname for c in chunk.cells)
        self.assertEqual(keys, [f"k{i:02}" for i in range(20)])

    def test_chunkCells(self) -> None:
        """Chunks never exceed the size; a cell bigger than a chunk goes alone."""
        cells = [b"x" * 10] * 7 + [b"y" * 100] + [b"z" * 10]
        chunks = chunkCells(cells, 45)
        self.assertEqual([len(c) for c in chunks], [44, 44, 22, 112, 22])
        self.assertEqual(b"".join(chunks).count(b"x"), 70)
        self.assertEqual(chunkCells([], 45), [b'{"cells":[]}'])

    @given(st.lists(st.binary(min_size=1, max_size=50), max_size=60), st.integers(13, 300))
    def test_chunkCellsProperty(self, cells: list[bytes], size: int) -> None:
        """Any cells in any chunk size: order kept, nothing lost, no chunk over size unless one cell."""
        chunks = chunkCells(cells, size)
        rebuilt: list[bytes] = []
        for chunk in chunks:
            inner = chunk[len(b'{"cells":[') : -2]
            parts = [c for c in cells[len(rebuilt) :]]
            count = 0
            length = -1
            while count < len(parts) and length + 1 + len(parts[count]) <= len(inner):
                length += 1 + len(parts[count])
                count += 1
            self.assertEqual(b",".join(parts[:count]), inner)
            rebuilt.extend(parts[:count])
            self.assertTrue(len(chunk) <= size or count == 1)
        self.assertEqual(rebuilt, cells)

    def test_cellsCarryAbsoluteExpiry(self) -> None:
        """Cells carry the Unix time they expire at (0 = never); receivers apply expire − now."""
        clock = Clock()
        clock.advance(1_700_000_000.25)
        peer, bus, _ = localPeer(clock=clock)
        kv(peer).set("forever", "v")
        kv(peer).set("soon", 5, expire=10)
        answer(peer, encodeSyncRequest(), sender=REQUESTER)
        [(_, body, _, _)] = bus.sent
        chunk = decodeMessage(body)
        assert isinstance(chunk, SyncCells)
        self.assertEqual(
            set(chunk.cells),
            {Cell("kv", "forever", "v", 0), Cell("kv", "soon", 5, 1_700_000_011)},
        )
        other, _, _ = localPeer([TableSpec("kv", autoexpire=100)], clock=clock)
        answer(other, body)
        answer(other, encodeCells([encodeCell("kv", "stale", "x", 20)]))
        self.assertEqual(
            sorted(kv(other).items()),
            [
                ("forever", "v", 1_700_000_100.25),
                ("soon", 5, 1_700_000_011.0),
                ("stale", "x", 1_700_000_100.25),
            ],
        )

    def test_unknownTablesSkipped(self) -> None:
        """Cells of unknown tables or without htname/cname are skipped and counted; the rest apply."""
        peer, _, _ = localPeer()
        body = encodeCells(
            [
                encodeCell("kv", "a", 1, 0),
                encodeCell("other", "b", 2, 0),
                b'{"cname":"c","type":0,"intval":3}',
                b'{"htname":"kv","type":0,"intval":3}',
            ]
        )
        self.assertEqual(answer(peer, body).code, 200)
        self.assertEqual(kv(peer).items(), [("a", 1, 0.0)])
        self.assertEqual(peer.counters["htable.sync.cells_skipped"], 3)


# ---------------------------------------------------------------------------
# Several nodes on an in-memory bus


def addHTableNode(
    network: MemoryNetwork,
    host: str,
    seeds: Sequence[MemoryNode] = (),
    specs: Sequence[TableSpec] = (TableSpec("kv"), TableSpec("cache", autoexpire=10)),
    **kwargs: Any,
) -> tuple[MemoryNode, HTablePeer]:
    """A node with an HTablePeer registered before it starts (so its join hook runs)."""
    node = network.addNode(host, seeds=seeds, start=False)
    peer = HTablePeer(node.bus, network.clock, specs, **kwargs)
    node.registerPeer(peer)
    node.stack.start()
    return node, peer


def htableRequests(node: MemoryNode) -> int:
    return node.bus.counters["out.requests.htable"]


class BusTests(SynchronousTestCase):
    """Three dmq-bus nodes with htable peers on one in-memory network."""

    def setUp(self) -> None:
        self.network = MemoryNetwork()
        a = addHTableNode(self.network, "127.0.0.1")
        b = addHTableNode(self.network, "127.0.0.2", [a[0]])
        c = addHTableNode(self.network, "127.0.0.3", [a[0]])
        self.nodes = [a[0], b[0], c[0]]
        self.peers = [a[1], b[1], c[1]]
        self.network.run(0.1)
        self.changes: list[list[TableChange]] = []
        for peer in self.peers:
            seen: list[TableChange] = []
            kv(peer).addObserver(seen.append)
            kv(peer, "cache").addObserver(seen.append)
            self.changes.append(seen)

    def everywhere(self, key: str, table: str = "kv") -> list[str | int | None]:
        return [kv(p, table).get(key) for p in self.peers]

    def test_setAppearsEverywhereOnce(self) -> None:
        """
        A set on one node appears on the other two; it costs exactly one
        KDMQ per other node, and the receivers send nothing (no re-replication).
        """
        before = [htableRequests(n) for n in self.nodes]
        kv(self.peers[0]).set("color", "blue")
        kv(self.peers[1]).set("count", 42)
        self.network.run(0.1)
        self.assertEqual(self.everywhere("color"), ["blue"] * 3)
        self.assertEqual(self.everywhere("count"), [42] * 3)
        sent = [htableRequests(n) - b for n, b in zip(self.nodes, before)]
        self.assertEqual(sent, [2, 2, 0])
        self.assertEqual(sum(p.counters["htable.replication.failures"] for p in self.peers), 0)

    def test_observersSeeOrigins(self) -> None:
        """The writer's observers see a local change; the others see a remote one."""
        kv(self.peers[0]).set("k", "v")
        self.network.run(0.1)
        self.assertEqual(self.changes[0], [TableChange("kv", "k", "v", "set", "local")])
        self.assertEqual(self.changes[1], [TableChange("kv", "k", "v", "set", "remote")])
        self.assertEqual(self.changes[2], [TableChange("kv", "k", "v", "set", "remote")])

    def test_delete(self) -> None:
        """A delete on one node removes the key everywhere."""
        kv(self.peers[0]).set("k", "v")
        self.network.run(0.1)
        self.assertTrue(kv(self.peers[2]).delete("k"))
        self.network.run(0.1)
        self.assertEqual(self.everywhere("k"), [None] * 3)
        self.assertEqual(self.changes[0][-1], TableChange("kv", "k", None, "delete", "remote"))

    def test_expiryByClock(self) -> None:
        """A key set with a 5 s lifetime is there until 5 s and gone after, on every node."""
        kv(self.peers[0]).set("k", "v", expire=5)
        self.network.run(4.9)
        self.assertEqual(self.everywhere("k"), ["v"] * 3)
        self.network.run(0.2)
        self.assertEqual(self.everywhere("k"), [None] * 3)
        for changes in self.changes:
            self.assertEqual(changes[-1], TableChange("kv", "k", None, "expired", "local"))

    def test_setExpire(self) -> None:
        """setExpire on one node shortens the key's life on all of them."""
        kv(self.peers[0]).set("k", "v")
        self.network.run(0.1)
        kv(self.peers[1]).setExpire("k", 2)
        self.network.run(1.9)
        self.assertEqual(self.everywhere("k"), ["v"] * 3)
        self.network.run(0.2)
        self.assertEqual(self.everywhere("k"), [None] * 3)

    def test_autoexpireTable(self) -> None:
        """In an autoexpire table every node drops the key autoexpire seconds after the set."""
        kv(self.peers[0], "cache").set("k", 1)
        self.network.run(9.9)
        self.assertEqual(self.everywhere("k", "cache"), [1] * 3)
        self.network.run(0.2)
        self.assertEqual(self.everywhere("k", "cache"), [None] * 3)

    def test_removeByRegexAndPrefix(self) -> None:
        """Remove by regex and by prefix on one node removes the matching keys everywhere."""
        table = kv(self.peers[0])
        for key in ("user:1", "user:2", "sess:1", "sess:2", "other"):
            table.set(key, key.upper())
        self.network.run(0.1)
        self.assertEqual(kv(self.peers[1]).removeMatching("^user:[0-9]$"), 2)
        self.assertEqual(kv(self.peers[2]).removeMatching("SESS", byValue=True, prefix=True), 2)
        self.network.run(0.1)
        for peer in self.peers:
            self.assertEqual([k for k, _, _ in kv(peer).items()], ["other"])

    def test_joinerReceivesKeys(self) -> None:
        """A node joining a bus that holds keys receives them all, as sync changes."""
        kv(self.peers[0]).set("a", "1")
        kv(self.peers[1]).set("b", 2)
        kv(self.peers[2], "cache").set("c", "3")
        self.network.run(0.1)
        _, peer = addHTableNode(self.network, "127.0.0.4", [self.nodes[1]])
        seen: list[TableChange] = []
        kv(peer).addObserver(seen.append)
        self.network.run(0.5)
        self.assertEqual(sorted((k, v) for k, v, _ in kv(peer).items()), [("a", "1"), ("b", 2)])
        self.assertEqual(kv(peer, "cache").get("c"), "3")
        self.assertEqual({c.origin for c in seen}, {"sync"})
        self.assertEqual(peer.counters["htable.sync.chunks_received"], 3)


class BigSyncTests(SynchronousTestCase):
    """Sync of a big table on an in-memory bus."""

    def fill(self, table: HashTable, count: int) -> None:
        for i in range(count):
            table.set(f"subscriber:{i:06}", f"sip:user{i}@example.com;expires={i % 3600}")

    def join(self, network: MemoryNetwork, seed: MemoryNode) -> tuple[HTablePeer, list[bytes]]:
        _, peer = addHTableNode(network, "127.0.0.9", [seed], specs=[TableSpec("kv")])
        received: list[bytes] = []
        original = peer.messageReceived

        def spy(message: DMQMessage) -> PeerResponse:
            if message.body.startswith(b'{"cells":'):
                received.append(message.body)
            return original(message)

        peer.messageReceived = spy  # type: ignore[method-assign]
        return peer, received

    def test_hundredThousandKeys(self) -> None:
        """
        A node joining a bus whose table holds 100,000 keys ends with all of
        them, sent in chunks of at most 60,000 bytes, about total/60,000 of them.
        """
        network = MemoryNetwork()
        seed, seedPeer = addHTableNode(network, "127.0.0.1", specs=[TableSpec("kv")])
        self.fill(kv(seedPeer), 100_000)
        peer, received = self.join(network, seed)
        network.run(5.0)
        self.assertEqual(len(kv(peer)), 100_000)
        self.assertEqual(kv(peer).items(), kv(seedPeer).items())
        total = sum(len(b) for b in received)
        self.assertTrue(all(len(b) <= 60_000 for b in received))
        self.assertGreaterEqual(len(received), math.ceil(total / 60_000))
        self.assertLessEqual(len(received), math.ceil(total / 60_000) + 1)
        self.assertEqual(seedPeer.counters["htable.sync.chunk_failures"], 0)

    def test_duplicatedDatagramsSendEachChunkOnce(self) -> None:
        """
        With every datagram delivered twice, the sync request reaches the
        peer once, and each chunk is sent and applied once.
        """
        network = MemoryNetwork(duplicate=1.0)
        seed, seedPeer = addHTableNode(network, "127.0.0.1", specs=[TableSpec("kv")])
        self.fill(kv(seedPeer), 5_000)
        peer, received = self.join(network, seed)
        network.run(3.0)
        self.assertEqual(len(kv(peer)), 5_000)
        self.assertEqual(seedPeer.counters["htable.sync.requests_received"], 1)
        self.assertEqual(len(received), seedPeer.counters["htable.sync.chunks_sent"])
        self.assertEqual(len(set(received)), len(received))
        self.assertGreater(network.delivered, 2 * len(received))


class ResyncBookkeepingTests(SynchronousTestCase):
    """What the heal re-sync remembers per node stays bounded under node churn."""

    def test_resyncTimesOfGoneNodesForgotten(self) -> None:
        """
        Nodes asked for a re-sync once and never seen again are forgotten
        once their interval is over: 5,000 such nodes, 100 at a time, leave
        at most a few hundred entries, and a node asked within the
        interval is still not asked twice.
        """
        peer, bus, clock = localPeer()
        interval = HTableLimits().resyncInterval
        for batch in range(50):
            nodes = [nodeAt(f"sip:127.0.{batch}.{i + 1}:5060") for i in range(100)]
            bus.nodes = functools.partial(list, [bus.localNode, *nodes])  # type: ignore[method-assign]
            peer.busJoined()
            clock.advance(interval + 1)
        self.assertLessEqual(len(peer._resyncAt), 2 * 100 + 64)
        last = nodes[0]
        peer.busJoined()
        peer._askBack(last.key)
        self.assertEqual(peer.counters["htable.resync.asked_back"], 0)
        clock.advance(interval)
        peer._askBack(last.key)
        self.assertEqual(peer.counters["htable.resync.asked_back"], 1)
