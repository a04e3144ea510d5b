"""
The control API (C{POST /RPC}, JSON-RPC 2.0): every method answers with
the result shapes, error codes and error messages a real Kamailio 5.6.3
answers over its jsonrpcs socket (captured below), the JSON-RPC 2.0
protocol rules, the body limit, and a real HTTP server on 127.0.0.1.
"""

# Twisted's assert* methods carry no annotations: calling them is fine here.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable
from io import BytesIO
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from dmq_bus.bus.dispatch import BusConfig
from dmq_bus.bus.nodelist import parseNodeLines
from dmq_bus.bus.values import NodeStatus
from dmq_bus.control import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    KAMAILIO_HTABLE_SLOTS,
    MAX_BATCH_REQUESTS,
    MAX_REQUEST_BODY,
    PARSE_ERROR,
    BoundedBody,
    ControlAPI,
    ControlResource,
    ControlService,
    Param,
    RPCError,
    RPCMethod,
    formatExpire,
    kamailioHash,
)
from dmq_bus.interfaces import IHashTable, IHashTables
from dmq_bus.peers.echo import EchoPeer
from dmq_bus.peers.htable import HTablePeer, TableSpec
from dmq_bus.service import DMQService, NodeConfig
from dmq_bus.sip.uri import SIPURI
from dmq_bus.testing import MemoryNetwork, MemoryNode

from .interop.kamailio import (
    SKIP_REASON,
    KamailioNode,
    allocatePorts,
    kamailioAvailable,
    waitFor,
)

# ---------------------------------------------------------------------------
# What Kamailio 5.6.3 answers, captured on 2 real nodes started with
# tests/interop/kamailio.py (KamailioNode; htable "kv" replicated over DMQ,
# autoexpire=0, size=10) through each node's jsonrpcs datagram socket
# (kamailio_rpc.sock), JSON requests {"jsonrpc": "2.0", "method", "params",
# "id": 1}. Results and error objects verbatim (the ports were 27132/27133):
#
#   dmq.list_nodes (UDP node)       -> the KAMAILIO_LIST_NODES array below
#   dmq.list_nodes (DMQ over TCP)   -> same, with "proto": "tcp"
#   dmq.list_nodes "x"              -> same result: extra params are ignored
#   dmq.remove <other node's URI>   -> "Ok. DMQ node removed." (and it is gone)
#   dmq.remove "sip:127.0.0.9:5060" -> "Ok. DMQ node removed." (nothing matched)
#   dmq.remove <its own URI>        -> "Ok. DMQ node removed." (nothing removed)
#   dmq.remove "not a uri"          -> error {"code": 500, "message": "Failure"}
#   dmq.remove 12                   -> error {"code": 500, "message": "Failure"}
#   dmq.remove                      -> error {"code": 500, "message": "Invalid Parameters"}
#   htable.sets kv color blue       -> "Ok. Key set to new value."
#   htable.seti kv n 42             -> "Ok. Key set to new value."
#   htable.get kv color             -> {"item": {"name": "color", "value": "blue", "flags": 2,
#                                       "expire": "NEVER"}}
#   htable.get kv n                 -> {"item": {"name": "n", "value": 42, "flags": 0,
#                                       "expire": "NEVER"}}
#   htable.get kv missing           -> error {"code": 500,
#                                       "message": "Key name doesn't exist in htable."}
#   htable.get nosuch color         -> error {"code": 500, "message": "No such htable"}
#   htable.get / htable.get kv      -> error {"code": 500, "message":
#                                       "Not enough parameters (htable name and key name)"}
#   htable.get kv color extra       -> answered as htable.get kv color (extra ignored)
#   htable.setex kv color 100       -> "Ok"
#   htable.setex kv missing 100     -> "Ok" (absent key: still Ok)
#   htable.setex kv color           -> error {"code": 500, "message":
#                                       "Not enough parameters (htable name, item name and expire)"}
#   htable.sets kv k                -> error {"code": 500, "message":
#                                       "Not enough parameters (htable name, key name and value)"}
#   htable.seti kv k                -> the same error as htable.sets kv k
#   htable.sets|seti|setex|delete|dump nosuch ... -> error {"code": 500,
#                                       "message": "No such htable"}
#   htable.delete kv color          -> "Ok. Key deleted."
#   htable.delete kv color (again)  -> error {"code": 404, "message": "Key not found in htable."}
#   htable.delete / htable.delete kv -> error {"code": 500, "message":
#                                       "Not enough parameters (htable name & key name"}  (sic)
#   htable.dump kv                  -> the KAMAILIO_DUMP array below; [] when empty
#   htable.dump                     -> error {"code": 500, "message": "No htable name given"}
#   htable.reload kv / nosuch / (no params) -> error {"code": 500, "message": "No htable db_url"}
#   no.such_method                  -> error {"code": 500, "message": "Method Not Found"}
#   system.methodHelp htable.get    -> "Get one key from a hash table."
#   system.methodHelp no.such       -> error {"code": 400, "message": "command not found"}
#   system.methodHelp               -> error {"code": 400, "message": "Method Name Expected"}
#   system.listMethods              -> array of method names (strings)
#   htable.stats (kv empty)         -> [{"name": "kv", "slots": 1024, "all": 0, "min": 0, "max": 0}]
#   htable.stats (after sets color, Color, a, b; seti n)
#                                   -> KAMAILIO_HTABLE_STATS below (color and Color share a
#                                      slot: keys hash case-folded)
#   htable.stats kv / nosuch        -> the same: parameters are ignored
#   htable.listTables (and with any parameter) -> KAMAILIO_LIST_TABLES below
#   system.methodHelp htable.stats  -> "Statistics about htables."
#   system.methodHelp htable.listTables -> "List all htables."
#   system.methodHelp dmq.remove    -> "Remove a DMQ node"
#   dmq.add / dmq.change_status     -> error {"code": 500, "message": "Method Not Found"}
#                                      (5.6.3 has neither; their 6.x answers, from the
#                                      Kamailio source, are in dmq_bus.control)
# Source (htable_rpc_stats, ht_api.c): min/max are the fewest/most cells of one slot over
# all slots, "No htables" (500) when none is declared, tables listed last declared first.
#
# Kamailio quirks we do NOT copy (see dmq_bus.control's docstring):
#   htable.seti kv k "notint"       -> "Ok. Key set to new value." and stores 0
#   htable.sets kv s 5 (a number)   -> "Ok. Key set to new value." and stores "0"
#   htable.seti kv big 2147483648   -> stores -2147483648 (wraps)
#   htable.seti kv fl 1.5           -> stores 1
#   htable.setex on a table without autoexpire: "Ok", and the expiry is not set
#   a body that is not JSON          -> no answer at all
#   {"jsonrpc": "2.0", "id": 5} (no method), "jsonrpc": "1.0", no "jsonrpc",
#   a batch, [] or 42               -> {"jsonrpc": "2.0", "result": {}, ...}
#   a notification (no id)          -> answered (the call is made)
#   "id": null                      -> answered with "id": 0
#   "method": 1                     -> the Kamailio node crashed (its jsonrpcs socket vanished)
#   params as an object             -> positional by member order
# kamcmd (binrpc) prints errors as "error: 500 - Key name doesn't exist in htable."
# and exits 0; an unknown method there reads "error: 500 - command X not found".

KAMAILIO_LIST_NODES: list[dict[str, Any]] = [
    {
        "host": "127.0.0.1",
        "port": "27133",
        "proto": "*",
        "resolved_ip": "127.0.0.1",
        "status": "active",
        "last_notification": 0,
        "local": 0,
    },
    {
        "host": "127.0.0.1",
        "port": "27132",
        "proto": "*",
        "resolved_ip": "127.0.0.1",
        "status": "active",
        "last_notification": 0,
        "local": 1,
    },
]

# after sets color=blue, seti n=42, neg=-7, k=0, big=-2147483648, fl=1, sets s="0"
KAMAILIO_DUMP: list[dict[str, Any]] = [
    {"entry": 99, "size": 1, "slot": [{"name": "n", "value": 42, "type": "int"}]},
    {"entry": 102, "size": 1, "slot": [{"name": "k", "value": 0, "type": "int"}]},
    {"entry": 125, "size": 1, "slot": [{"name": "s", "value": "0", "type": "str"}]},
    {"entry": 349, "size": 1, "slot": [{"name": "neg", "value": -7, "type": "int"}]},
    {
        "entry": 384,
        "size": 1,
        "slot": [{"name": "big", "value": -2147483648, "type": "int"}],
    },
    {"entry": 689, "size": 1, "slot": [{"name": "fl", "value": 1, "type": "int"}]},
    {"entry": 928, "size": 1, "slot": [{"name": "color", "value": "blue", "type": "str"}]},
]

# a second node: sets kv é, ÿÿÿÿx, Color, abcdefghij = "v" (non-ASCII and long keys)
KAMAILIO_DUMP_UNICODE: list[dict[str, Any]] = [
    {"entry": 114, "size": 1, "slot": [{"name": "abcdefghij", "value": "v", "type": "str"}]},
    {"entry": 137, "size": 1, "slot": [{"name": "ÿÿÿÿx", "value": "v", "type": "str"}]},
    {"entry": 196, "size": 1, "slot": [{"name": "é", "value": "v", "type": "str"}]},
    {"entry": 928, "size": 1, "slot": [{"name": "Color", "value": "v", "type": "str"}]},
]

KAMAILIO_HTABLE_STATS: list[dict[str, Any]] = [
    {"name": "kv", "slots": 1024, "all": 5, "min": 0, "max": 2}
]
KAMAILIO_LIST_TABLES: list[dict[str, Any]] = [
    {
        "name": "kv",
        "dbtable": "",
        "dbmode": 0,
        "expire": 0,
        "updateexpire": 1,
        "size": 1024,
        "dmqreplicate": 1,
    }
]

KAMAILIO_GET_STR = {"item": {"name": "color", "value": "blue", "flags": 2, "expire": "NEVER"}}
KAMAILIO_GET_INT = {"item": {"name": "n", "value": 42, "flags": 0, "expire": "NEVER"}}

SET_OK = "Ok. Key set to new value."
KAMAILIO_ERRORS: dict[str, dict[str, Any]] = {
    "no method": {"code": 500, "message": "Method Not Found"},
    "get missing key": {"code": 500, "message": "Key name doesn't exist in htable."},
    "no table": {"code": 500, "message": "No such htable"},
    "get too few": {
        "code": 500,
        "message": "Not enough parameters (htable name and key name)",
    },
    "set too few": {
        "code": 500,
        "message": "Not enough parameters (htable name, key name and value)",
    },
    "setex too few": {
        "code": 500,
        "message": "Not enough parameters (htable name, item name and expire)",
    },
    "delete too few": {"code": 500, "message": "Not enough parameters (htable name & key name"},
    "delete missing key": {"code": 404, "message": "Key not found in htable."},
    "dump too few": {"code": 500, "message": "No htable name given"},
    "reload": {"code": 500, "message": "No htable db_url"},
    "remove too few": {"code": 500, "message": "Invalid Parameters"},
    "remove bad uri": {"code": 500, "message": "Failure"},
    "help unknown": {"code": 400, "message": "command not found"},
    "help too few": {"code": 400, "message": "Method Name Expected"},
    "no htables": {"code": 500, "message": "No htables"},
    # Kamailio 6.x (src/modules/dmq/dmq.c, rpc_dmq_add and rpc_dmq_change_status)
    "add too few": {"code": 500, "message": "Invalid Parameters"},
    "add twice": {"code": 500, "message": "Node is already added"},
    "change too few": {"code": 500, "message": "Invalid Parameters"},
    "change not found": {"code": 500, "message": "Node Not Found"},
    "change local": {"code": 500, "message": "Node is local"},
}


# ---------------------------------------------------------------------------
# A faithful in-memory IHashTables


@implementer(IHashTable)
class MemoryHashTable:
    """One table in a dict, expiring on a clock; replication is not modelled."""

    def __init__(self, name: str, clock: Clock, defaultExpire: float = 0.0) -> None:
        self.name = name
        self.defaultExpire = defaultExpire
        self.clock = clock
        self.cells: dict[str, tuple[str | int, float]] = {}
        self.observers: list[Callable[[Any], None]] = []
        self.changes: list[tuple[str, str]] = []

    def _live(self, key: str) -> tuple[str | int, float] | None:
        cell = self.cells.get(key)
        if cell is not None and cell[1] and cell[1] <= self.clock.seconds():
            del self.cells[key]
            return None
        return cell

    def _changed(self, action: str, key: str) -> None:
        self.changes.append((action, key))
        for observer in list(self.observers):
            observer((action, key))

    def get(self, key: str) -> str | int | None:
        cell = self._live(key)
        return None if cell is None else cell[0]

    def set(self, key: str, value: str | int, expire: float | None = None) -> None:
        if isinstance(value, int) and not -(2**31) <= value < 2**31:
            raise ValueError(f"{value} is outside the 32-bit signed range")
        seconds = self.defaultExpire if expire is None else expire
        self.cells[key] = (value, self.clock.seconds() + seconds if seconds else 0.0)
        self._changed("set", key)

    def setExpire(self, key: str, seconds: float) -> bool:
        cell = self._live(key)
        if cell is None:
            return False
        self.cells[key] = (cell[0], self.clock.seconds() + seconds)
        self._changed("expire", key)
        return True

    def delete(self, key: str) -> bool:
        if self._live(key) is None:
            return False
        del self.cells[key]
        self._changed("delete", key)
        return True

    def removeMatching(self, pattern: str, *, byValue: bool = False, prefix: bool = False) -> int:
        def matches(key: str, value: str | int) -> bool:
            subject = value if byValue else key
            if not isinstance(subject, str):
                return False
            return (
                subject.startswith(pattern) if prefix else re.search(pattern, subject) is not None
            )

        doomed = [k for k, v, _ in self.items() if matches(k, v)]
        for key in doomed:
            self.delete(key)
        return len(doomed)

    def items(self) -> list[tuple[str, str | int, float]]:
        return [(k, c[0], c[1]) for k in list(self.cells) if (c := self._live(k)) is not None]

    def __len__(self) -> int:
        return len(self.items())

    def addObserver(self, observer: Callable[[Any], None]) -> Callable[[], None]:
        self.observers.append(observer)
        return lambda: self.observers.remove(observer)


@implementer(IHashTables)
class MemoryHashTables:
    """The tables of one node."""

    def __init__(self, *tables: MemoryHashTable) -> None:
        self._tables = {t.name: t for t in tables}

    def table(self, name: str) -> IHashTable | None:
        return self._tables.get(name)

    def tables(self) -> list[IHashTable]:
        return list(self._tables.values())


# ---------------------------------------------------------------------------
# helpers


def makeBus(nodes: int = 2) -> tuple[MemoryNetwork, list[MemoryNode]]:
    """C{nodes} joined in-memory nodes on 127.0.0.1:27132, 27133, ..."""
    network = MemoryNetwork()
    first = network.addNode("127.0.0.1", 27132, pingInterval=1.0, pingTimeout=1.0)
    others = [
        network.addNode("127.0.0.1", 27132 + i, seeds=[first], pingInterval=1.0, pingTimeout=1.0)
        for i in range(1, nodes)
    ]
    network.run(3.0)
    return network, [first, *others]


class APITestCase(SynchronousTestCase):
    """A ControlAPI on node 27132 of a joined 2-node in-memory bus, with table kv."""

    def setUp(self) -> None:
        self.network, self.nodes = makeBus(2)
        self.node = self.nodes[0]
        self.kv = MemoryHashTable("kv", self.network.clock)
        self.tables = MemoryHashTables(self.kv)
        self.api = ControlAPI(self.node.bus, self.tables, self.node.stack.stats)

    def call(self, method: str, *params: Any) -> Any:
        """The result of one call (it must succeed synchronously)."""
        return self.successResultOf(self.api.call(method, list(params)))

    def fault(self, method: str, *params: Any) -> dict[str, Any]:
        """The error object of one call (it must fail synchronously)."""
        failure = self.failureResultOf(self.api.call(method, list(params)), RPCError)
        error: RPCError = failure.value  # type: ignore[assignment]
        return error.toJSON()

    def rpc(self, payload: Any) -> Any:
        """The decoded response to a raw JSON-RPC payload (None: no response)."""
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        answer = self.successResultOf(self.api.handle(body))
        return None if answer is None else json.loads(answer)


def shape(value: Any) -> Any:
    """The JSON shape of a value: dict keys, list element shapes, scalar types."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value[:1]]
    return type(value).__name__


# ---------------------------------------------------------------------------


class FakeTableTests(SynchronousTestCase):
    """The in-memory tables used here are faithful to the interfaces."""

    def test_provides(self) -> None:
        """The fake tables provide IHashTables and IHashTable in full."""
        table = MemoryHashTable("kv", Clock())
        self.assertTrue(verifyObject(IHashTable, table))
        self.assertTrue(verifyObject(IHashTables, MemoryHashTables(table)))

    def test_expiry(self) -> None:
        """A cell given an expiry vanishes when its time comes, as IHashTable says."""
        clock = Clock()
        table = MemoryHashTable("kv", clock)
        table.set("a", "x", expire=5)
        clock.advance(4.9)
        self.assertEqual(table.get("a"), "x")
        clock.advance(0.1)
        self.assertIsNone(table.get("a"))
        self.assertEqual(len(table), 0)


class ListNodesTests(APITestCase):
    """C{dmq.list_nodes} and C{dmq.remove} answer like Kamailio's."""

    def test_sameShapeAsKamailio(self) -> None:
        """Every entry has exactly Kamailio's members with Kamailio's JSON types."""
        result = self.call("dmq.list_nodes")
        self.assertEqual(shape(result), shape(KAMAILIO_LIST_NODES))
        for entry in result:
            self.assertEqual(shape(entry), shape(KAMAILIO_LIST_NODES[0]))

    def test_sameValuesAsKamailio(self) -> None:
        """
        A joined pair of nodes is listed as Kamailio lists it: the other
        node first, this node last with local 1, ports as strings, proto *
        without a transport; only last_notification differs (ours is the
        clock time of the node's last notification, Kamailio's always 0).
        """
        result = self.call("dmq.list_nodes")
        self.assertGreater(result[0]["last_notification"], 0)
        self.assertEqual(result[1]["last_notification"], 0)
        for entry in result:
            entry["last_notification"] = 0
        self.assertEqual(result, KAMAILIO_LIST_NODES)

    def test_lastNotificationIsClockTime(self) -> None:
        """last_notification follows the node's notifications on the clock, in whole seconds."""
        self.network.run(10.0)
        other = self.node.bus.nodes()[0]
        entry = self.call("dmq.list_nodes")[0]
        self.assertEqual(entry["last_notification"], int(other.lastNotification))
        self.assertGreater(entry["last_notification"], 10)

    def test_transportAndStatus(self) -> None:
        """A node with ;transport=tcp shows proto tcp; statuses are Kamailio's words."""
        self.node.bus.nodeList.merge(
            parseNodeLines(b"sip:127.0.0.5:5070;transport=tcp;status=pending\r\n")
        )
        entry = self.call("dmq.list_nodes")[0]
        self.assertEqual(
            (entry["host"], entry["port"], entry["proto"], entry["status"], entry["local"]),
            ("127.0.0.5", "5070", "tcp", "pending", 0),
        )

    def test_removeOther(self) -> None:
        """dmq.remove drops the node the URI names and answers Kamailio's text."""
        self.assertEqual(self.call("dmq.remove", "sip:127.0.0.1:27133"), "Ok. DMQ node removed.")
        self.assertEqual([n["port"] for n in self.call("dmq.list_nodes")], ["27132"])

    def test_removeIgnoresUserAndParameters(self) -> None:
        """dmq.remove matches on host, port and transport only, as Kamailio does."""
        self.call("dmq.remove", "sip:notification_peer@127.0.0.1:27133;status=active")
        self.assertEqual(len(self.call("dmq.list_nodes")), 1)

    def test_removeNothingOrSelf(self) -> None:
        """Removing an unknown node or this node answers ok and changes nothing, as Kamailio."""
        self.assertEqual(self.call("dmq.remove", "sip:127.0.0.9:5060"), "Ok. DMQ node removed.")
        self.assertEqual(self.call("dmq.remove", "sip:127.0.0.1:27132"), "Ok. DMQ node removed.")
        self.assertEqual(len(self.call("dmq.list_nodes")), 2)

    def test_removeErrors(self) -> None:
        """No URI, or one that does not parse (also a number), gets Kamailio's errors."""
        self.assertEqual(self.fault("dmq.remove"), KAMAILIO_ERRORS["remove too few"])
        self.assertEqual(self.fault("dmq.remove", "not a uri"), KAMAILIO_ERRORS["remove bad uri"])
        self.assertEqual(self.fault("dmq.remove", 12), KAMAILIO_ERRORS["remove bad uri"])

    def test_removedNodeComesBack(self) -> None:
        """As with Kamailio, a removed node that is alive comes back when it notifies again."""
        self.call("dmq.remove", "sip:127.0.0.1:27133")
        self.network.run(5.0)
        self.assertEqual(len(self.call("dmq.list_nodes")), 2)


class MembershipRPCTests(APITestCase):
    """C{dmq.add} and C{dmq.change_status}, Kamailio 6.x's membership calls."""

    def entry(self, port: str) -> dict[str, Any]:
        """The dmq.list_nodes entry of the node on C{port}."""
        return next(e for e in self.call("dmq.list_nodes") if e["port"] == port)

    def test_addPending(self) -> None:
        """An added node is listed as pending at once, newest first, with 6.x's answer."""
        self.assertEqual(self.call("dmq.add", "sip:127.0.0.1:27140"), "Ok. DMQ node added.")
        nodes = self.call("dmq.list_nodes")
        self.assertEqual((nodes[0]["port"], nodes[0]["status"]), ("27140", "pending"))

    def test_addedNodeThatAnswersBecomesActive(self) -> None:
        """A node added by hand that is alive turns active with the next ping's answer."""
        third = self.network.addNode("127.0.0.1", 27140, pingInterval=1.0, pingTimeout=1.0)
        self.call("dmq.add", "sip:127.0.0.1:27140")
        self.network.run(1.5)
        self.assertEqual(self.entry("27140")["status"], "active")
        self.assertEqual(len(third.bus.nodes()), 3)

    def test_addedNodeThatIsDeadGoes(self) -> None:
        """A node added by hand that never answers is disabled, then removed, as any node."""
        self.call("dmq.add", "sip:127.0.0.1:27141")
        self.network.run(2.5)
        self.assertEqual(self.entry("27141")["status"], "disabled")
        self.network.run(3.0)
        self.assertNotIn("27141", [e["port"] for e in self.call("dmq.list_nodes")])

    def test_addWithStatusAndTransport(self) -> None:
        """A ;status= word in the URI is the node's first status; a transport is kept."""
        self.call("dmq.add", "sip:127.0.0.1:27142;transport=tcp;status=disabled")
        entry = self.call("dmq.list_nodes")[0]
        self.assertEqual((entry["proto"], entry["status"]), ("tcp", "disabled"))

    def test_addErrors(self) -> None:
        """Known nodes, this node, bad URIs, hosts and words get 6.x's errors."""
        self.assertEqual(self.fault("dmq.add"), KAMAILIO_ERRORS["add too few"])
        self.assertEqual(self.fault("dmq.add", "sip:127.0.0.1:27133"), KAMAILIO_ERRORS["add twice"])
        self.assertEqual(self.fault("dmq.add", "sip:127.0.0.1:27132"), KAMAILIO_ERRORS["add twice"])
        for uri in (
            "not a uri",
            "sip:node.example.com:5060",
            "sip:127.0.0.1:27143;transport=sctp",
            "sip:127.0.0.1:27143;status=sleepy",
        ):
            error = self.fault("dmq.add", uri)
            self.assertEqual((error["code"], error["message"]), (500, "Failure"), uri)
            self.assertIn("data", error)
        self.assertEqual(len(self.call("dmq.list_nodes")), 2)

    def test_addWhenFull(self) -> None:
        """At the node-list limit dmq.add fails, saying so, and adds nothing."""
        self.node.bus.nodeList.maxNodes = 2
        error = self.fault("dmq.add", "sip:127.0.0.1:27144")
        self.assertEqual(error["message"], "Failure")
        self.assertIn("full", error["data"])

    def test_addReleasesGhostHold(self) -> None:
        """A node removed for not answering may be added back by hand at once."""
        other = self.node.bus.nodeList.find(SIPURI.parse("sip:127.0.0.1:27133"))
        assert other is not None
        self.node.bus.nodeList.remove(other.key, hold=120.0)
        self.call("dmq.add", "sip:127.0.0.1:27133")
        self.assertEqual(self.entry("27133")["status"], "pending")

    def test_changeStatus(self) -> None:
        """change_status sets the status and answers 6.x's texts, also when nothing changes."""
        uri = "sip:127.0.0.1:27133"
        self.assertEqual(
            self.call("dmq.change_status", uri, "disabled"), "Ok. DMQ node status changed."
        )
        self.assertEqual(self.entry("27133")["status"], "disabled")
        self.assertEqual(
            self.call("dmq.change_status", uri, "disabled"),
            "Ok. DMQ node status is already disabled.",
        )
        self.call("dmq.change_status", uri, "not_active")
        self.assertEqual(self.entry("27133")["status"], "timeout")
        self.call("dmq.change_status", uri, "pending")
        self.assertEqual(self.entry("27133")["status"], "pending")

    def test_changeStatusEvent(self) -> None:
        """A change by hand is a membership event like any other."""
        events: list[Any] = []
        self.node.bus.addMembershipObserver(events.append)
        self.call("dmq.change_status", "sip:127.0.0.1:27133", "disabled")
        self.assertEqual(
            [(e.change.value, e.node.status.word, e.previous.word) for e in events],
            [("status", "disabled", "active")],
        )

    def test_disabledNodeComesBack(self) -> None:
        """A live node disabled by hand is active again after its next answer (5.6.3's rule)."""
        self.call("dmq.change_status", "sip:127.0.0.1:27133", "disabled")
        self.network.run(1.5)
        self.assertEqual(self.entry("27133")["status"], "active")

    def test_changeStatusErrors(self) -> None:
        """Unknown words, unknown nodes and this node get 6.x's errors; nothing changes."""
        self.assertEqual(self.fault("dmq.change_status"), KAMAILIO_ERRORS["change too few"])
        self.assertEqual(
            self.fault("dmq.change_status", "sip:127.0.0.1:27133"),
            KAMAILIO_ERRORS["change too few"],
        )
        bad = self.fault("dmq.change_status", "sip:127.0.0.1:27133", "asleep")
        self.assertEqual(bad["code"], 500)
        self.assertTrue(bad["message"].startswith("Invalid Status - use: active"))
        for uri in ("sip:127.0.0.9:5060", "not a uri"):
            self.assertEqual(
                self.fault("dmq.change_status", uri, "active"),
                KAMAILIO_ERRORS["change not found"],
            )
        self.assertEqual(
            self.fault("dmq.change_status", "sip:127.0.0.1:27132", "disabled"),
            KAMAILIO_ERRORS["change local"],
        )
        self.assertEqual([e["status"] for e in self.call("dmq.list_nodes")], ["active"] * 2)


class StatsTests(APITestCase):
    """C{dmq.stats}, ours: everything an operator needs in one object."""

    def test_everyCounter(self) -> None:
        """Every counter and gauge of every layer is in the answer, with its value."""
        stats = self.node.stack.stats()
        result = self.call("dmq.stats")
        self.assertEqual(result["counters"], stats)
        self.assertTrue(stats)

    def test_peersNodesTransactions(self) -> None:
        """Peers (channel, description), node counts per status, and open transactions."""
        self.node.registerPeer(EchoPeer())
        result = self.call("dmq.stats")
        self.assertEqual(result["node"], "sip:127.0.0.1:27132")
        self.assertEqual([p["channel"] for p in result["peers"]], ["notification_peer", "echo"])
        self.assertEqual(result["peers"][1]["description"], EchoPeer.description)
        self.assertEqual(
            result["nodes"],
            {"active": 2, "timeout": 0, "disabled": 0, "pending": 0, "total": 2},
        )
        self.assertEqual(set(result["transactions"]), {"client_open", "server_open"})
        self.assertEqual(
            result["transactions"]["client_open"],
            self.node.stack.transactions.openClientTransactions,
        )

    def test_countsFollowStatus(self) -> None:
        """A node that stops answering shows up under its new status word."""
        self.nodes[1].crash()
        self.network.run(5.0)
        nodes = self.call("dmq.stats")["nodes"]
        self.assertEqual(nodes["active"], 1)
        self.assertEqual(sum(nodes[s.word] for s in NodeStatus), nodes["total"])

    def test_jsonSerializable(self) -> None:
        """The whole answer goes through JSON unchanged."""
        result = self.call("dmq.stats")
        self.assertEqual(json.loads(json.dumps(result)), result)


class HashTableTests(APITestCase):
    """C{htable.*} answers with Kamailio's shapes, texts and error codes."""

    def test_getString(self) -> None:
        """sets then get answers exactly what Kamailio answered for a string cell."""
        self.assertEqual(self.call("htable.sets", "kv", "color", "blue"), SET_OK)
        self.assertEqual(self.call("htable.get", "kv", "color"), KAMAILIO_GET_STR)
        self.assertEqual(self.kv.get("color"), "blue")

    def test_getInteger(self) -> None:
        """seti then get answers exactly what Kamailio answered for an integer cell."""
        self.assertEqual(self.call("htable.seti", "kv", "n", 42), SET_OK)
        self.assertEqual(self.call("htable.get", "kv", "n"), KAMAILIO_GET_INT)
        self.assertEqual(self.kv.get("n"), 42)

    def test_getExpire(self) -> None:
        """A cell with an expiry shows it as local time YYYY-MM-DD HH:MM:SS, as Kamailio."""
        self.network.clock.advance(1_700_000_000)
        self.call("htable.sets", "kv", "color", "blue")
        self.assertEqual(self.call("htable.setex", "kv", "color", 100), "Ok")
        expire = self.call("htable.get", "kv", "color")["item"]["expire"]
        self.assertRegex(expire, r"\A\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\Z")
        self.assertEqual(expire, formatExpire(self.network.clock.seconds() + 100))
        self.assertEqual(formatExpire(0), "NEVER")

    def test_setexAbsentKey(self) -> None:
        """setex on an absent key answers Ok, as Kamailio does."""
        self.assertEqual(self.call("htable.setex", "kv", "missing", 100), "Ok")

    def test_delete(self) -> None:
        """delete answers Kamailio's text, then 404 for the now absent key."""
        self.call("htable.sets", "kv", "color", "blue")
        self.assertEqual(self.call("htable.delete", "kv", "color"), "Ok. Key deleted.")
        self.assertEqual(
            self.fault("htable.delete", "kv", "color"), KAMAILIO_ERRORS["delete missing key"]
        )

    def test_missingKeyAndTable(self) -> None:
        """An absent key or table gets Kamailio's error codes and messages."""
        self.assertEqual(
            self.fault("htable.get", "kv", "missing"), KAMAILIO_ERRORS["get missing key"]
        )
        for method, params in [
            ("htable.get", ("nosuch", "k")),
            ("htable.sets", ("nosuch", "k", "v")),
            ("htable.seti", ("nosuch", "k", 1)),
            ("htable.setex", ("nosuch", "k", 100)),
            ("htable.delete", ("nosuch", "k")),
            ("htable.dump", ("nosuch",)),
        ]:
            self.assertEqual(self.fault(method, *params), KAMAILIO_ERRORS["no table"], method)

    def test_tooFewParams(self) -> None:
        """Too few parameters get each method's own Kamailio message (typo included)."""
        cases = [
            ("htable.get", (), "get too few"),
            ("htable.get", ("kv",), "get too few"),
            ("htable.sets", ("kv", "k"), "set too few"),
            ("htable.seti", ("kv", "k"), "set too few"),
            ("htable.setex", ("kv", "k"), "setex too few"),
            ("htable.delete", (), "delete too few"),
            ("htable.delete", ("kv",), "delete too few"),
            ("htable.dump", (), "dump too few"),
            ("htable.reload", (), "reload"),
        ]
        for method, params, expected in cases:
            self.assertEqual(self.fault(method, *params), KAMAILIO_ERRORS[expected], method)

    def test_dumpSameAsKamailio(self) -> None:
        """The same cells dump to exactly Kamailio's answer: slots, sizes, order, types."""
        for key, value in [("n", 42), ("k", 0), ("neg", -7), ("big", -(2**31)), ("fl", 1)]:
            self.call("htable.seti", "kv", key, value)
        self.call("htable.sets", "kv", "s", "0")
        self.call("htable.sets", "kv", "color", "blue")
        self.assertEqual(self.call("htable.dump", "kv"), KAMAILIO_DUMP)

    def test_dumpUnicodeKeys(self) -> None:
        """Non-ASCII, mixed-case and long keys land in Kamailio's slots too."""
        for key in ["é", "ÿÿÿÿx", "Color", "abcdefghij"]:
            self.call("htable.sets", "kv", key, "v")
        self.assertEqual(self.call("htable.dump", "kv"), KAMAILIO_DUMP_UNICODE)

    def test_dumpSharedSlot(self) -> None:
        """Keys that share a slot are listed in one entry whose size counts them."""
        keys = [f"key{i}" for i in range(3000)]
        for key in keys:
            self.call("htable.sets", "kv", key, "v")
        dump = self.call("htable.dump", "kv")
        self.assertEqual(sum(e["size"] for e in dump), 3000)
        self.assertTrue(all(e["size"] == len(e["slot"]) for e in dump))
        self.assertTrue(all(0 <= e["entry"] < KAMAILIO_HTABLE_SLOTS for e in dump))
        self.assertEqual([e["entry"] for e in dump], sorted({kamailioHash(k) % 1024 for k in keys}))

    def test_dumpEmpty(self) -> None:
        """An empty table dumps to [], as Kamailio's."""
        self.assertEqual(self.call("htable.dump", "kv"), [])

    def test_statsSameAsKamailio(self) -> None:
        """
        htable.stats after the same writes answers exactly what Kamailio
        answered: color and Color share a slot there, and here.
        """
        self.assertEqual(
            self.call("htable.stats"),
            [{"name": "kv", "slots": 1024, "all": 0, "min": 0, "max": 0}],
        )
        for key, value in [("color", "blue"), ("Color", "x"), ("a", "1"), ("b", "2")]:
            self.call("htable.sets", "kv", key, value)
        self.call("htable.seti", "kv", "n", 42)
        self.assertEqual(self.call("htable.stats"), KAMAILIO_HTABLE_STATS)

    def test_statsFullSlots(self) -> None:
        """min is the fewest cells of one slot: above 0 only once every slot holds one."""
        for i in range(10_000):
            self.kv.set(f"k{i}", i)
        stats = self.call("htable.stats")[0]
        self.assertEqual((stats["all"], stats["min"]), (10_000, 0))  # 12 slots still empty
        for i in range(10_000, 20_000):
            self.kv.set(f"k{i}", i)
        stats = self.call("htable.stats")[0]
        self.assertEqual(stats["all"], 20_000)
        self.assertGreater(stats["min"], 0)
        self.assertGreaterEqual(stats["max"], stats["min"])

    def test_listTablesSameAsKamailio(self) -> None:
        """htable.listTables answers Kamailio's members and values for the same table."""
        self.assertEqual(self.call("htable.listTables"), KAMAILIO_LIST_TABLES)

    def test_tablesInKamailioOrder(self) -> None:
        """Several tables come last declared first, with their own autoexpire, as Kamailio."""
        clock = self.network.clock
        tables = MemoryHashTables(
            MemoryHashTable("a", clock), MemoryHashTable("b", clock, defaultExpire=60)
        )
        api = ControlAPI(self.node.bus, tables, self.node.stack.stats)
        listed = self.successResultOf(api.call("htable.listTables"))
        self.assertEqual([(t["name"], t["expire"]) for t in listed], [("b", 60), ("a", 0)])
        stats = self.successResultOf(api.call("htable.stats"))
        self.assertEqual([t["name"] for t in stats], ["b", "a"])

    def test_noTablesDeclared(self) -> None:
        """A node whose htable peer declares no table answers Kamailio's No htables."""
        api = ControlAPI(self.node.bus, MemoryHashTables(), self.node.stack.stats)
        for method in ("htable.stats", "htable.listTables"):
            failure = self.failureResultOf(api.call(method), RPCError)
            self.assertEqual(failure.value.toJSON(), KAMAILIO_ERRORS["no htables"])  # type: ignore[attr-defined]

    def test_statsHelp(self) -> None:
        """system.methodHelp gives Kamailio's help texts for the new methods."""
        self.assertEqual(
            self.call("system.methodHelp", "htable.stats"), "Statistics about htables."
        )
        self.assertEqual(self.call("system.methodHelp", "htable.listTables"), "List all htables.")

    def test_reload(self) -> None:
        """reload has no database to read from: always Kamailio's 'No htable db_url'."""
        self.assertEqual(self.fault("htable.reload", "kv"), KAMAILIO_ERRORS["reload"])
        self.assertEqual(self.fault("htable.reload", "nosuch"), KAMAILIO_ERRORS["reload"])

    def test_setiRange(self) -> None:
        """An integer outside 32 bits is refused (-32602), not wrapped as Kamailio does."""
        error = self.fault("htable.seti", "kv", "big", 2**31)
        self.assertEqual(error["code"], INVALID_PARAMS)
        self.assertIsNone(self.kv.get("big"))
        self.assertEqual(self.call("htable.seti", "kv", "min", -(2**31)), SET_OK)

    def test_tableRefusesValue(self) -> None:
        """A ValueError from the table becomes Kamailio's 'Failed to set the item', with why."""

        def refuse(key: str, value: str | int, expire: float | None = None) -> None:
            raise ValueError("no room")

        self.kv.set = refuse  # type: ignore[method-assign]
        self.assertEqual(
            self.fault("htable.sets", "kv", "k", "v"),
            {"code": 500, "message": "Failed to set the item", "data": "no room"},
        )

    def test_wrongTypes(self) -> None:
        """A string for an integer, or a non-string key, is -32602 (Kamailio stores 0)."""
        for method, params in [
            ("htable.seti", ("kv", "k", "notint")),
            ("htable.seti", ("kv", "k", 1.5)),
            ("htable.seti", ("kv", "k", True)),
            ("htable.setex", ("kv", "k", "100")),
            ("htable.get", ("kv", None)),
            ("htable.sets", ("kv", "k", ["v"])),
        ]:
            self.assertEqual(self.fault(method, *params)["code"], INVALID_PARAMS, method)
        self.assertIsNone(self.kv.get("k"))

    def test_integerForString(self) -> None:
        """An integer where a string goes is its decimal text (kamcmd sends 42 as a number)."""
        self.assertEqual(self.call("htable.sets", "kv", 42, 7), SET_OK)
        self.assertEqual(self.kv.get("42"), "7")
        self.assertEqual(self.call("htable.get", "kv", 42)["item"]["value"], "7")

    def test_tooManyParams(self) -> None:
        """Extra parameters are refused (-32602) instead of silently ignored."""
        error = self.fault("htable.get", "kv", "color", "extra")
        self.assertEqual(error["code"], INVALID_PARAMS)
        self.assertIn("2 parameters (htname key)", error["message"])
        self.assertEqual(self.fault("dmq.list_nodes", "x")["code"], INVALID_PARAMS)

    def test_writesGoThroughTheTable(self) -> None:
        """Writes use the table's own methods, so they replicate like any local write."""
        self.call("htable.sets", "kv", "a", "1")
        self.call("htable.setex", "kv", "a", 10)
        self.call("htable.delete", "kv", "a")
        self.assertEqual(self.kv.changes, [("set", "a"), ("expire", "a"), ("delete", "a")])

    def test_noTables(self) -> None:
        """A node without hash tables has no htable methods: Kamailio's 'Method Not Found'."""
        api = ControlAPI(self.node.bus, None, self.node.stack.stats)
        failure = self.failureResultOf(api.call("htable.get", ["kv", "k"]), RPCError)
        self.assertEqual(failure.value.toJSON(), KAMAILIO_ERRORS["no method"])  # type: ignore[attr-defined]
        self.assertFalse([m for m in api.methods if m.startswith("htable.")])


class RegistryTests(APITestCase):
    """The method registry: Kamailio's names, help, and room for more methods."""

    def test_kamailioNames(self) -> None:
        """Every Kamailio method we mirror is registered under its Kamailio name."""
        self.assertTrue(
            {
                "dmq.list_nodes",
                "dmq.remove",
                "htable.get",
                "htable.sets",
                "htable.seti",
                "htable.setex",
                "htable.delete",
                "htable.dump",
                "htable.reload",
                "htable.stats",
                "htable.listTables",
                "dmq.add",
                "dmq.change_status",
                "dmq.stats",
            }
            <= set(self.call("system.listMethods"))
        )

    def test_methodHelp(self) -> None:
        """system.methodHelp gives Kamailio's help texts and errors."""
        self.assertEqual(
            self.call("system.methodHelp", "htable.get"), "Get one key from a hash table."
        )
        self.assertEqual(self.call("system.methodHelp", "dmq.list_nodes"), "Print all nodes")
        self.assertEqual(
            self.fault("system.methodHelp", "no.such"), KAMAILIO_ERRORS["help unknown"]
        )
        self.assertEqual(self.fault("system.methodHelp"), KAMAILIO_ERRORS["help too few"])

    def test_unknownMethod(self) -> None:
        """An unknown method gets Kamailio's answer, 500 Method Not Found."""
        self.assertEqual(self.fault("no.such_method"), KAMAILIO_ERRORS["no method"])

    def test_register(self) -> None:
        """A new method is one register() call: parameters checked, Deferred results welcome."""
        later: Deferred[str] = Deferred()
        self.api.register(
            RPCMethod("app.echo", lambda text, n: later, (Param("text"), Param("n", int)))
        )
        d = self.api.call("app.echo", ["hi", 3])
        self.assertNoResult(d)
        later.callback("done")
        self.assertEqual(self.successResultOf(d), "done")
        self.assertEqual(self.fault("app.echo", "hi")["code"], INVALID_PARAMS)

    def test_unserializableResult(self) -> None:
        """A method answering what JSON cannot hold is logged and answered -32603."""
        self.api.register(RPCMethod("app.odd", lambda: {1j}))
        answer = self.rpc({"jsonrpc": "2.0", "method": "app.odd", "id": 4})
        self.assertEqual(
            answer,
            {"jsonrpc": "2.0", "error": {"code": -32603, "message": "Internal error"}, "id": 4},
        )
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)

    def test_registerTwice(self) -> None:
        """Registering a name twice is refused."""
        with self.assertRaises(ValueError):
            self.api.register(RPCMethod("dmq.list_nodes", lambda: None))

    def test_methodFailure(self) -> None:
        """A method's unexpected exception is logged and answered -32603; the API goes on."""

        def broken() -> None:
            raise RuntimeError("boom")

        self.api.register(RPCMethod("app.broken", broken))
        self.assertEqual(self.fault("app.broken"), {"code": -32603, "message": "Internal error"})
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(len(self.call("dmq.list_nodes")), 2)


class ProtocolTests(APITestCase):
    """JSON-RPC 2.0 as the specification says, where Kamailio's jsonrpcs does not."""

    def test_single(self) -> None:
        """A request is answered with jsonrpc, result and its id (a string id too)."""
        self.assertEqual(
            self.rpc({"jsonrpc": "2.0", "method": "htable.dump", "params": ["kv"], "id": "a"}),
            {"jsonrpc": "2.0", "result": [], "id": "a"},
        )

    def test_errorResponse(self) -> None:
        """A method error is answered with the error object and the request's id."""
        self.assertEqual(
            self.rpc({"jsonrpc": "2.0", "method": "htable.get", "params": ["kv", "x"], "id": 7}),
            {"jsonrpc": "2.0", "error": KAMAILIO_ERRORS["get missing key"], "id": 7},
        )

    def test_parseError(self) -> None:
        """A body that is not JSON gets -32700 with id null (Kamailio does not answer)."""
        for body in [b"{not json", b"\xff\xfe", b'{"a": NaN}', b"[" * 100000]:
            self.assertEqual(
                self.rpc(body),
                {
                    "jsonrpc": "2.0",
                    "error": {"code": PARSE_ERROR, "message": "Parse error"},
                    "id": None,
                },
            )

    def test_invalidRequest(self) -> None:
        """Things that are not requests get -32600 (Kamailio answers an empty result)."""
        for payload in [
            42,
            "x",
            {"jsonrpc": "2.0", "id": 5},
            {"jsonrpc": "1.0", "method": "dmq.list_nodes", "id": 5},
            {"method": "dmq.list_nodes", "id": 5},
            {"jsonrpc": "2.0", "method": 1, "id": 5},
            {"jsonrpc": "2.0", "method": "dmq.list_nodes", "params": "x", "id": 5},
        ]:
            answer = self.rpc(payload)
            self.assertEqual(answer["error"]["code"], INVALID_REQUEST, payload)
            self.assertEqual(answer["id"], 5 if isinstance(payload, dict) else None)

    def test_badID(self) -> None:
        """An id that is neither string, number nor null makes the request invalid, id null."""
        answer = self.rpc({"jsonrpc": "2.0", "method": "dmq.list_nodes", "id": [1]})
        self.assertEqual((answer["error"]["code"], answer["id"]), (INVALID_REQUEST, None))

    def test_nullID(self) -> None:
        """id null is a request (answered with id null), not a notification."""
        answer = self.rpc({"jsonrpc": "2.0", "method": "htable.dump", "params": ["kv"], "id": None})
        self.assertEqual(answer, {"jsonrpc": "2.0", "result": [], "id": None})

    def test_notification(self) -> None:
        """A request without id is carried out and not answered, even when it fails."""
        self.assertIsNone(
            self.rpc({"jsonrpc": "2.0", "method": "htable.sets", "params": ["kv", "a", "b"]})
        )
        self.assertEqual(self.kv.get("a"), "b")
        self.assertIsNone(self.rpc({"jsonrpc": "2.0", "method": "no.such"}))

    def test_namedParams(self) -> None:
        """Parameters may be given by name; unknown names are -32602, missing ones Kamailio's."""
        self.kv.set("color", "blue")
        answer = self.rpc(
            {
                "jsonrpc": "2.0",
                "method": "htable.get",
                "params": {"htname": "kv", "key": "color"},
                "id": 1,
            }
        )
        self.assertEqual(answer["result"], KAMAILIO_GET_STR)
        answer = self.rpc(
            {
                "jsonrpc": "2.0",
                "method": "htable.get",
                "params": {"htname": "kv", "k": "c"},
                "id": 1,
            }
        )
        self.assertEqual(answer["error"]["code"], INVALID_PARAMS)
        answer = self.rpc(
            {"jsonrpc": "2.0", "method": "htable.get", "params": {"htname": "kv"}, "id": 1}
        )
        self.assertEqual(answer["error"], KAMAILIO_ERRORS["get too few"])

    def test_batch(self) -> None:
        """A batch is answered with one response per request, notifications left out."""
        answer = self.rpc(
            [
                {"jsonrpc": "2.0", "method": "htable.sets", "params": ["kv", "x", "y"], "id": 1},
                {"jsonrpc": "2.0", "method": "htable.sets", "params": ["kv", "z", "w"]},
                {"jsonrpc": "2.0", "method": "htable.get", "params": ["kv", "nope"], "id": 2},
                {"foo": "bar"},
                {"jsonrpc": "2.0", "method": "htable.get", "params": ["kv", "z"], "id": 3},
            ]
        )
        self.assertEqual(
            answer,
            [
                {"jsonrpc": "2.0", "result": SET_OK, "id": 1},
                {"jsonrpc": "2.0", "error": KAMAILIO_ERRORS["get missing key"], "id": 2},
                {
                    "jsonrpc": "2.0",
                    "error": {
                        "code": INVALID_REQUEST,
                        "message": 'Invalid Request: jsonrpc must be "2.0"',
                    },
                    "id": None,
                },
                {
                    "jsonrpc": "2.0",
                    "result": {"item": {"name": "z", "value": "w", "flags": 2, "expire": "NEVER"}},
                    "id": 3,
                },
            ],
        )

    def test_batchOfNotifications(self) -> None:
        """A batch of notifications only is not answered at all."""
        self.assertIsNone(self.rpc([{"jsonrpc": "2.0", "method": "dmq.list_nodes"}] * 3))

    def test_emptyBatch(self) -> None:
        """An empty batch is one -32600 error."""
        answer = self.rpc([])
        self.assertEqual((answer["error"]["code"], answer["id"]), (INVALID_REQUEST, None))

    def test_batchLimit(self) -> None:
        """A batch of MAX_BATCH_REQUESTS is served; one more is refused as a whole."""
        request = {"jsonrpc": "2.0", "method": "htable.dump", "params": ["kv"], "id": 1}
        self.assertEqual(len(self.rpc([request] * MAX_BATCH_REQUESTS)), MAX_BATCH_REQUESTS)
        answer = self.rpc([request] * (MAX_BATCH_REQUESTS + 1))
        self.assertEqual(answer["error"]["code"], INVALID_REQUEST)
        self.assertIn(str(MAX_BATCH_REQUESTS), answer["error"]["message"])

    def test_batchWaitsForDeferreds(self) -> None:
        """A batch is answered once its slowest method has answered, in request order."""
        later: Deferred[str] = Deferred()
        self.api.register(RPCMethod("app.slow", lambda: later))
        d = self.api.handle(
            json.dumps(
                [
                    {"jsonrpc": "2.0", "method": "app.slow", "id": 1},
                    {"jsonrpc": "2.0", "method": "htable.dump", "params": ["kv"], "id": 2},
                ]
            ).encode()
        )
        self.assertNoResult(d)
        later.callback("late")
        answer = json.loads(self.successResultOf(d) or b"null")
        self.assertEqual([a["id"] for a in answer], [1, 2])
        self.assertEqual(answer[0]["result"], "late")

    def test_undecodableValues(self) -> None:
        """A value holding bytes that are not UTF-8 still gives valid JSON, losslessly."""
        self.kv.set("raw", b"\xff\xfe".decode("utf-8", "surrogateescape"))
        body = self.successResultOf(
            self.api.handle(b'{"jsonrpc":"2.0","method":"htable.get","params":["kv","raw"],"id":1}')
        )
        assert body is not None
        body.decode("ascii")
        value = json.loads(body)["result"]["item"]["value"]
        self.assertEqual(value.encode("utf-8", "surrogateescape"), b"\xff\xfe")


# ---------------------------------------------------------------------------
# the HTTP resource


def post(resource: ControlResource, body: bytes) -> DummyRequest:
    """Render one POST with C{body} on C{resource}; the finished request."""
    request = DummyRequest([])
    request.method = b"POST"
    request.content = BytesIO(body)  # type: ignore[attr-defined]
    request.render(resource)
    return request


class ResourceTests(APITestCase):
    """C{POST /RPC} through twisted.web."""

    def setUp(self) -> None:
        super().setUp()
        self.resource = ControlResource(self.api)

    def test_post(self) -> None:
        """A POST is answered 200 with the JSON response, as application/json."""
        request = post(self.resource, b'{"jsonrpc":"2.0","method":"dmq.list_nodes","id":1}')
        self.assertEqual(request.finished, 1)
        self.assertIn(request.responseCode, (None, 200))
        self.assertEqual(
            request.responseHeaders.getRawHeaders(b"content-type"), [b"application/json"]
        )
        self.assertEqual(len(json.loads(b"".join(request.written))["result"]), 2)

    def test_notificationNoContent(self) -> None:
        """A notification is answered 204 with no body."""
        request = post(self.resource, b'{"jsonrpc":"2.0","method":"dmq.list_nodes"}')
        self.assertEqual((request.responseCode, request.written), (204, []))

    def test_bodyLimitEdge(self) -> None:
        """A body of exactly maxBody bytes is served; one byte more is 413 and -32600."""
        resource = ControlResource(self.api, maxBody=100)
        request = b'{"jsonrpc":"2.0","method":"dmq.list_nodes","id":1}'
        exact = request + b" " * (100 - len(request))
        self.assertEqual(json.loads(b"".join(post(resource, exact).written))["id"], 1)
        over = post(resource, exact + b" ")
        self.assertEqual(over.responseCode, 413)
        self.assertEqual(json.loads(b"".join(over.written))["error"]["code"], INVALID_REQUEST)

    def test_defaultLimit(self) -> None:
        """The default body limit is 1 MiB."""
        self.assertEqual(MAX_REQUEST_BODY, 1024 * 1024)
        self.assertEqual(ControlResource(self.api).maxBody, MAX_REQUEST_BODY)

    def test_boundedBody(self) -> None:
        """The site keeps at most limit + 1 bytes of a body, however much arrives."""
        body = BoundedBody(10)
        for _ in range(1000):
            body.write(b"x" * 1000)
        body.seek(0)
        self.assertEqual(body.read(), b"x" * 11)
        self.assertEqual(body.received, 1_000_000)

    def test_clientGone(self) -> None:
        """When the client disconnects before a slow answer, nothing is written."""
        later: Deferred[str] = Deferred()
        self.api.register(RPCMethod("app.slow", lambda: later))
        request = DummyRequest([])
        request.method = b"POST"
        request.content = BytesIO(b'{"jsonrpc":"2.0","method":"app.slow","id":1}')  # type: ignore[attr-defined]
        request.render(self.resource)
        request.processingFailed(Exception("gone"))  # fails notifyFinish
        later.callback("late")
        self.assertEqual(request.written, [])


# ---------------------------------------------------------------------------
# a real HTTP server on 127.0.0.1


class RealHTTPTests(TestCase):
    """The control service on a real socket, driven by a real HTTP client."""

    def setUp(self) -> None:
        network, nodes = makeBus(2)
        self.kv = MemoryHashTable("kv", network.clock)
        api = ControlAPI(nodes[0].bus, MemoryHashTables(self.kv), nodes[0].stack.stats)
        self.service = ControlService(api, "tcp:0:interface=127.0.0.1", reactor, maxBody=4096)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent(reactor, pool=self.pool)

    @inlineCallbacks
    def request(self, method: bytes, path: str, body: bytes | None = None) -> Any:
        from twisted.web.client import FileBodyProducer

        port = yield self.service.whenListening()
        url = f"http://127.0.0.1:{port.getHost().port}{path}"
        producer = None if body is None else FileBodyProducer(BytesIO(body))
        response: IResponse = yield self.agent.request(
            method,
            url.encode(),
            Headers({b"content-type": [b"application/json"]}),
            producer,
        )
        content = yield readBody(response)
        return response, content

    @inlineCallbacks
    def test_postOverHTTP(self) -> Any:
        """A JSON-RPC call over real HTTP on 127.0.0.1 sets and reads a table cell."""
        response, body = yield self.request(
            b"POST",
            "/RPC",
            b'{"jsonrpc":"2.0","method":"htable.sets","params":["kv","a","b"],"id":1}',
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(body)["result"], SET_OK)
        self.assertEqual(self.kv.get("a"), "b")

    @inlineCallbacks
    def test_getNotAllowed(self) -> Any:
        """GET /RPC is 405 Method Not Allowed, naming POST as allowed."""
        response, _ = yield self.request(b"GET", "/RPC")
        self.assertEqual(response.code, 405)
        self.assertIn(b"POST", b",".join(response.headers.getRawHeaders(b"allow", [])))

    @inlineCallbacks
    def test_otherPath(self) -> Any:
        """Any other path is 404."""
        response, _ = yield self.request(b"POST", "/other", b"{}")
        self.assertEqual(response.code, 404)

    @inlineCallbacks
    def test_bodyTooLarge(self) -> Any:
        """A body over the site's limit is 413 with a JSON-RPC error saying so."""
        response, body = yield self.request(b"POST", "/RPC", b" " * 100_000)
        self.assertEqual(response.code, 413)
        self.assertIn("4096", json.loads(body)["error"]["message"])

    @inlineCallbacks
    def test_notificationOverHTTP(self) -> Any:
        """A notification over HTTP is answered 204 No Content."""
        response, body = yield self.request(
            b"POST", "/RPC", b'{"jsonrpc":"2.0","method":"htable.sets","params":["kv","n","1"]}'
        )
        self.assertEqual((response.code, body), (204, b""))
        self.assertEqual(self.kv.get("n"), "1")

    def test_portInUse(self) -> Deferred[None]:
        """Starting on a port already in use fails at once, loudly."""

        def second(port: Any) -> None:
            other = ControlService(
                self.service.api, f"tcp:{port.getHost().port}:interface=127.0.0.1", reactor
            )
            self.assertRaises(CannotListenError, other.startService)
            self.assertFalse(other.running)
            self.failureResultOf(other.whenListening(), CannotListenError)

        return self.service.whenListening().addCallback(second)

    def test_stopClosesPort(self) -> Deferred[None]:
        """After stopService the port no longer accepts connections."""
        from twisted.internet.endpoints import TCP4ClientEndpoint
        from twisted.internet.error import ConnectionRefusedError
        from twisted.internet.protocol import Factory, Protocol

        port: list[int] = []

        def stop(listening: Any) -> Any:
            port.append(listening.getHost().port)
            return self.service.stopService()

        def connect(_: object) -> Deferred[Any]:
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port[0])
            return self.assertFailure(
                endpoint.connect(Factory.forProtocol(Protocol)), ConnectionRefusedError
            )

        d = self.service.whenListening().addCallback(stop).addCallback(connect)
        return d.addCallback(lambda _: None)


# ---------------------------------------------------------------------------
# side by side with a real Kamailio 5.6.3 node


def kamailioRPC(node: KamailioNode, method: str, *params: Any) -> dict[str, Any]:
    """
    One JSON-RPC call on C{node}'s jsonrpcs datagram socket; the whole
    response object. Blocking (briefly), like the harness's kamcmd calls.
    """
    local = os.path.join(tempfile.gettempdir(), f"dmqctl-{os.getpid()}-{id(params)}.sock")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(local)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(local)
        try:
            sock.settimeout(5.0)
            request: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": 1}
            if params:
                request["params"] = list(params)
            sock.sendto(json.dumps(request).encode(), os.path.join(node.dir, "kamailio_rpc.sock"))
            answer: dict[str, Any] = json.loads(sock.recv(1 << 20))
            return answer
        finally:
            os.unlink(local)


class KamailioParityTests(TestCase):
    """
    A dmq-bus node joined with a real Kamailio node: both answer the same
    calls the same way, each describing the bus from its own side.
    """

    skip = None if kamailioAvailable() else SKIP_REASON
    transport = "udp"
    timeout = 60

    def address(self, port: int) -> str:
        suffix = ";transport=tcp" if self.transport == "tcp" else ""
        return f"sip:127.0.0.1:{port}{suffix}"

    @inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        base = tempfile.mkdtemp(prefix="dmqc-")
        self.addCleanup(shutil.rmtree, base, True)
        self.kamailioPort, self.ourPort = allocatePorts(2)
        self.kamailio = KamailioNode(self.kamailioPort, baseDir=base, transport=self.transport)
        self.addCleanup(self.kamailio.stop)
        self.kamailio.start()
        config = BusConfig(
            serverAddress=SIPURI.parse(self.address(self.ourPort)),
            notificationAddresses=(SIPURI.parse(self.address(self.kamailioPort)),),
        )
        self.service = DMQService(NodeConfig(bus=config), reactor)
        self.tables = HTablePeer(self.service.bus, reactor, [TableSpec("kv")])
        self.service.bus.registerPeer(self.tables)
        self.service.startService()
        self.addCleanup(lambda: self.service.running and self.service.stopService())
        self.api = ControlAPI(self.service.bus, self.tables, self.service.stack.stats)

        def joined() -> bool:
            theirs = kamailioRPC(self.kamailio, "dmq.list_nodes")["result"]
            ours = [n.status.word for n in self.service.bus.nodes()]
            return [n["status"] for n in theirs] == ["active"] * 2 and ours == ["active"] * 2

        yield waitFor(joined, 20)

    def ours(self, method: str, *params: Any) -> dict[str, Any]:
        body = json.dumps({"jsonrpc": "2.0", "method": method, "params": list(params), "id": 1})
        answer = self.successResultOf(self.api.handle(body.encode()))
        assert answer is not None
        result: dict[str, Any] = json.loads(answer)
        return result

    def test_listNodes(self) -> None:
        """
        dmq.list_nodes: the same entries, member for member, from each side
        (local flipped; last_notification is ours to fill in).
        """
        theirs = kamailioRPC(self.kamailio, "dmq.list_nodes")["result"]
        ours = self.ours("dmq.list_nodes")["result"]
        self.assertEqual(shape(ours), shape(theirs))

        def view(entries: list[dict[str, Any]]) -> dict[str, tuple[Any, ...]]:
            return {
                e["port"]: tuple(
                    v for k, v in sorted(e.items()) if k not in ("last_notification", "local")
                )
                for e in entries
            }

        self.assertEqual(view(ours), view(theirs))
        self.assertEqual(
            {e["port"]: e["local"] for e in ours},
            {e["port"]: 1 - e["local"] for e in theirs},
        )
        self.assertEqual([e["last_notification"] for e in theirs], [0, 0])

    def test_sameErrors(self) -> None:
        """Unknown methods and dmq.remove errors give the same error objects on both."""
        for method, params in [
            ("no.such_method", ()),
            ("dmq.remove", ()),
            ("dmq.remove", ("not a uri",)),
        ]:
            self.assertEqual(
                self.ours(method, *params)["error"],
                kamailioRPC(self.kamailio, method, *params)["error"],
                method,
            )

    def test_sameRemoveAnswer(self) -> None:
        """dmq.remove of a node neither knows answers the same text on both."""
        uri = "sip:127.0.0.9:5060"
        self.assertEqual(
            self.ours("dmq.remove", uri)["result"],
            kamailioRPC(self.kamailio, "dmq.remove", uri)["result"],
        )

    @inlineCallbacks
    def test_htableStats(self) -> Any:
        """
        htable.stats and htable.listTables: after writes on Kamailio have
        replicated to us, both nodes answer the very same JSON.
        """
        for key, value in [("color", "blue"), ("Color", "x"), ("a", "1"), ("b", "2")]:
            kamailioRPC(self.kamailio, "htable.sets", "kv", key, value)
        kamailioRPC(self.kamailio, "htable.seti", "kv", "n", 42)
        table = self.tables.table("kv")
        assert table is not None
        yield waitFor(lambda: len(table) == 5, 10)
        for method in ("htable.stats", "htable.listTables"):
            self.assertEqual(
                self.ours(method)["result"], kamailioRPC(self.kamailio, method)["result"], method
            )
        self.assertEqual(self.ours("htable.stats")["result"], KAMAILIO_HTABLE_STATS)


class KamailioParityTCPTests(KamailioParityTests):
    """The same, with DMQ over TCP (proto tcp in every entry)."""

    transport = "tcp"


class ObservedStatsTests(SynchronousTestCase):
    """dmq.stats reports what observed Kamailio channels received."""

    def test_observedSummaries(self) -> None:
        """An observed channel's summary appears under 'observed', keyed by channel."""
        from dmq_bus.peers.observed import UsrlocObserver

        network = MemoryNetwork()
        node = network.addNode("127.0.0.1")
        observer = UsrlocObserver(network.clock)
        node.registerPeer(observer)
        api = ControlAPI(node.bus, None, node.stack.stats)
        stats = api.busStats()
        self.assertEqual(list(stats["observed"]), ["usrloc"])
        self.assertEqual(stats["observed"]["usrloc"], observer.summary())
