"""
The control API: JSON-RPC 2.0 over HTTP at C{POST /RPC}, speaking Kamailio
5.6.3's RPC method names, result shapes, error codes and error messages
(as its C{jsonrpcs} module answers them; the captured answers are in
C{tests/test_control.py}), so what works against C{kamcmd}/C{jsonrpcs} on a
Kamailio node works against a dmq-bus node too.

Methods (see L{ControlAPI}): C{dmq.list_nodes}, C{dmq.remove}, C{dmq.add}
and C{dmq.change_status} (Kamailio 6.x names), C{dmq.stats} (ours), and,
when the node holds hash tables, C{htable.get}, C{htable.sets},
C{htable.seti}, C{htable.setex}, C{htable.delete}, C{htable.dump},
C{htable.reload}, C{htable.stats}, C{htable.listTables}; plus
C{system.listMethods} and C{system.methodHelp}.

The same site also serves C{GET /metrics} (Prometheus text format 0.0.4,
see L{dmq_bus.metrics}) and C{GET /events} (membership changes as a
Server-Sent Events stream, see L{MembershipEvents}).

The API has no authentication: listen on loopback only (the default
endpoint does; any other interface is logged as a warning).

Where we differ from Kamailio on purpose:

  - unknown methods answer Kamailio's C{500 Method Not Found} (not -32601);
  - requests are checked as JSON-RPC 2.0 says: a body that is not JSON gets
    C{-32700} (Kamailio does not answer), a request that is not a request
    C{-32600} (Kamailio answers an empty result), a notification (no
    C{id}) gets no answer (Kamailio answers), a batch is answered element
    by element (Kamailio answers an empty result);
  - parameters are checked: too few get Kamailio's per-method message (code
    500), too many or of the wrong type get C{-32602} (Kamailio ignores
    extra parameters and reads a string given for an integer as 0); a
    string parameter also takes an integer, as its decimal text (so
    C{dmq-ctl htable.get kv 42} works without C{s:42}); parameters may be
    given by name (an object) as well as by position;
  - C{htable.seti} refuses a value outside 32 bits (Kamailio wraps it);
  - C{dmq.list_nodes} gives C{last_notification} as the clock time of the
    node's last notification (Kamailio 5.6.3 always gives 0);
  - C{dmq.add} adds a node as C{pending} unless its URI says C{;status=}
    (Kamailio 6.x adds it C{active}: 6.1 has no pending), and
    C{dmq.change_status} takes our four status words (and 6.1's
    C{not_active}, read as C{timeout}); see L{ControlAPI.addNode} and
    L{ControlAPI.changeStatus}.
"""

from __future__ import annotations

import io
import ipaddress
import json
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import attrs
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IListeningPort,
    IPushProducer,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from dmq_bus import __version__, metrics
from dmq_bus.bus.dispatch import DMQBus
from dmq_bus.bus.nodelist import NODE_TRANSPORTS
from dmq_bus.bus.values import MembershipEvent, Node, NodeStatus, isIPLiteral
from dmq_bus.interfaces import IHashTable, IHashTables, IObservedChannel
from dmq_bus.sip.errors import SIPParseError
from dmq_bus.sip.uri import SIPURI, stripBrackets

DEFAULT_CONTROL_ENDPOINT = "tcp:8060:interface=127.0.0.1"
"""Where the control API listens unless told otherwise (a Twisted endpoint string)."""

RPC_PATH = b"RPC"
"""Where JSON-RPC is answered: C{/RPC}, as Kamailio's xhttp_rpc/jsonrpcs."""

METRICS_PATH = b"metrics"
"""C{GET /metrics}: Prometheus text format 0.0.4 (see L{dmq_bus.metrics})."""

EVENTS_PATH = b"events"
"""C{GET /events}: membership changes as Server-Sent Events (see L{MembershipEvents})."""

HEARTBEAT_INTERVAL = 15.0
"""
Seconds between the comment lines (C{: heartbeat}) written to every
C{/events} client, so that proxies and clients see the stream alive.
"""

MAX_EVENT_BACKLOG = 1000
"""
Most writes (events and heartbeats) one C{/events} client may fall behind
by: what its connection cannot take yet waits in its queue, and a client
whose queue grows past this is disconnected (counted as
C{events.clients_dropped_slow}). With no membership changes at all, a
client that reads nothing is dropped after this many heartbeats.
"""

MAX_EVENT_CLIENTS = 64
"""
Most C{/events} clients at once; one more is answered C{503} (counted as
C{events.clients_refused_limit}).
"""

MAX_REQUEST_BODY = 1024 * 1024
"""
Most bytes one HTTP request body may hold. A larger body is not stored past
this size and is answered with HTTP 413 and a JSON-RPC C{-32600} error.
"""

MAX_BATCH_REQUESTS = 1000
"""Most requests one batch may hold; a larger batch is answered with one C{-32600} error."""

IDLE_TIMEOUT = 60.0
"""Seconds an idle HTTP connection to the API stays open."""

KAMAILIO_HTABLE_SLOTS = 1024
"""
C{htable.dump} groups cells into numbered slots as Kamailio does. Our tables
have no slots; we number them as a Kamailio table of this many slots
(C{size=10}) would, so a dump of the same keys looks the same on both.
"""

# JSON-RPC 2.0 error codes
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

# Kamailio 5.6.3's answers (captured from its jsonrpcs module)
KAMAILIO_FAULT = 500
METHOD_NOT_FOUND_MESSAGE = "Method Not Found"
NO_SUCH_HTABLE = "No such htable"
KEY_NOT_FOUND_GET = "Key name doesn't exist in htable."
KEY_NOT_FOUND_DELETE = "Key not found in htable."
SET_OK = "Ok. Key set to new value."
SETEX_OK = "Ok"
DELETE_OK = "Ok. Key deleted."
REMOVE_OK = "Ok. DMQ node removed."
ADD_OK = "Ok. DMQ node added."
NODE_ALREADY_ADDED = "Node is already added"
NODE_NOT_FOUND = "Node Not Found"
NODE_IS_LOCAL = "Node is local"
STATUS_CHANGED = "Ok. DMQ node status changed."
STATUS_ALREADY = "Ok. DMQ node status is already {word}."
INVALID_STATUS = "Invalid Status - use: active, disabled, pending, timeout"
INVALID_PARAMETERS = "Invalid Parameters"
FAILURE = "Failure"
NO_HTABLES = "No htables"
SET_FAILED = "Failed to set the item"
NEVER = "NEVER"

INT32 = range(-(2**31), 2**31)


class RPCError(Exception):
    """
    A JSON-RPC error answer: C{code}, C{message} and optional C{data}.
    Methods raise it; it becomes the C{error} member of the response.
    """

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(code, message, data)
        self.code = code
        self.message = message
        self.data = data

    def toJSON(self) -> dict[str, Any]:
        """The C{error} object."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


def invalidParams(detail: str) -> RPCError:
    """A C{-32602} error saying what is wrong with the parameters."""
    return RPCError(INVALID_PARAMS, f"Invalid params: {detail}")


@attrs.frozen
class Param:
    """
    One positional parameter of a method.

    @ivar name: its name (also its key when parameters come as an object).
    @ivar kind: C{str} (an integer is also taken, as its decimal text) or
        C{int} (an integer, not a boolean).
    """

    name: str
    kind: type[str] | type[int] = str

    def convert(self, value: object) -> str | int:
        """
        The value as the method gets it.
        @raise RPCError: C{-32602} when it has the wrong type.
        """
        if self.kind is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            raise invalidParams(f"{self.name} must be an integer, not {_jsonType(value)}")
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        raise invalidParams(f"{self.name} must be a string, not {_jsonType(value)}")


def _jsonType(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


@attrs.frozen
class RPCMethod:
    """
    An entry of the method registry.

    @ivar name: the JSON-RPC method name.
    @ivar function: called with the converted parameters, positionally;
        returns the result (JSON-serializable) or a Deferred firing with it;
        raises L{RPCError} for an error answer. Must not block.
    @ivar params: its parameters, all required.
    @ivar help: one line for C{system.methodHelp}.
    @ivar tooFew: the error for fewer parameters than C{params} (Kamailio's
        own message where it has one).
    """

    name: str
    function: Callable[..., Any]
    params: tuple[Param, ...] = ()
    help: str = ""
    tooFew: RPCError | None = None

    def bind(self, params: Sequence[object] | Mapping[str, object]) -> list[str | int]:
        """
        The converted arguments for C{params} (an array, or an object keyed
        by parameter name).
        @raise RPCError: missing, extra or mistyped parameters.
        """
        if isinstance(params, Mapping):
            unknown = sorted(set(params) - {p.name for p in self.params})
            if unknown:
                raise invalidParams(f"{self.name} has no parameter {', '.join(unknown)}")
            if any(p.name not in params for p in self.params):
                raise self._tooFew()
            return [p.convert(params[p.name]) for p in self.params]
        if len(params) < len(self.params):
            raise self._tooFew()
        if len(params) > len(self.params):
            raise invalidParams(f"{self.name} takes {self._signature()}, got {len(params)}")
        return [p.convert(v) for p, v in zip(self.params, params)]

    def _signature(self) -> str:
        if not self.params:
            return "no parameters"
        names = " ".join(p.name for p in self.params)
        return f"{len(self.params)} parameter{'s' * (len(self.params) > 1)} ({names})"

    def _tooFew(self) -> RPCError:
        if self.tooFew is not None:
            return self.tooFew
        return invalidParams(f"{self.name} takes {self._signature()}")


def kamailioHash(key: str) -> int:
    """
    Kamailio's C{core_case_hash} of C{key} (what C{htable} hashes keys
    with): ASCII case-folded, bytes read as signed C{char} as on x86.
    """
    data = key.encode("utf-8", "surrogateescape")

    def fold(c: int) -> int:
        c = c - 256 if c >= 128 else c
        return c | 0x20 if 65 <= c <= 90 else c

    mask = 0xFFFFFFFF
    h = 0
    end = len(data)
    p = 0
    while p <= end - 4:
        v = ((fold(data[p]) << 24) + (fold(data[p + 1]) << 16) + (fold(data[p + 2]) << 8)) + fold(
            data[p + 3]
        )
        v &= mask
        h = (h + (v ^ (v >> 3))) & mask
        p += 4
    v = 0
    while p < end:
        v = ((v << 8) + fold(data[p])) & mask
        p += 1
    h = (h + (v ^ (v >> 3))) & mask
    return ((h + (h >> 11)) + ((h >> 13) + (h >> 23))) & mask


def formatExpire(expiresAt: float) -> str:
    """C{htable.get}'s C{expire}: C{NEVER}, or local time C{YYYY-MM-DD HH:MM:SS}."""
    if not expiresAt:
        return NEVER
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(expiresAt))


def nodeEntry(node: Node) -> dict[str, Any]:
    """One element of C{dmq.list_nodes}, shaped as Kamailio's."""
    host = node.uri.host
    return {
        "host": host,
        "port": "" if node.uri.port is None else str(node.uri.port),
        "proto": node.uri.param("transport") or "*",
        "resolved_ip": stripBrackets(host) if isIPLiteral(host) else "",
        "status": node.status.word,
        "last_notification": int(node.lastNotification),
        "local": 1 if node.local else 0,
    }


class ControlAPI:
    """
    The JSON-RPC methods of one node and the JSON-RPC 2.0 protocol around
    them, its metrics (L{metricFamilies}) and its membership event stream
    (L{events}). Add methods with L{register}; nothing here blocks.

    @ivar methods: the registry, method name -> L{RPCMethod}.
    @ivar events: the L{MembershipEvents} behind C{GET /events}, on the
        bus's clock.
    """

    log = Logger()

    def __init__(
        self,
        bus: DMQBus,
        tables: IHashTables | None,
        stats: Callable[[], Mapping[str, int]],
    ) -> None:
        self.bus = bus
        self.tables = tables
        self.stats = stats
        self.events = MembershipEvents(bus.addMembershipObserver, bus.clock)
        self.methods: dict[str, RPCMethod] = {}
        self._registerDMQ()
        if tables is not None:
            self._registerHashTables()
        self.register(
            RPCMethod("system.listMethods", self.listMethods, help="Lists the RPC methods.")
        )
        self.register(
            RPCMethod(
                "system.methodHelp",
                self.methodHelp,
                (Param("method"),),
                help="Print the help string for a given method.",
                tooFew=RPCError(400, "Method Name Expected"),
            )
        )

    def register(self, method: RPCMethod) -> None:
        """
        Add C{method} to the registry.
        @raise ValueError: a method of that name exists.
        """
        if method.name in self.methods:
            raise ValueError(f"RPC method {method.name!r} already registered")
        self.methods[method.name] = method

    # -- the protocol

    def call(
        self, name: str, params: Sequence[object] | Mapping[str, object] = ()
    ) -> Deferred[Any]:
        """
        Call method C{name} with the JSON C{params}. Fires with the result;
        fails with L{RPCError} (any other exception is logged and becomes
        C{-32603}).
        """
        method = self.methods.get(name)
        if method is None:
            return defer.fail(RPCError(KAMAILIO_FAULT, METHOD_NOT_FOUND_MESSAGE))
        try:
            arguments = method.bind(params)
        except RPCError:
            return defer.fail()
        d = defer.maybeDeferred(method.function, *arguments)

        def unexpected(failure: Failure) -> Failure:
            if failure.check(RPCError):
                return failure
            self.log.failure("RPC method {method} failed", failure, method=name)
            return Failure(RPCError(INTERNAL_ERROR, "Internal error"))

        return d.addErrback(unexpected)

    def handle(self, body: bytes) -> Deferred[bytes | None]:
        """
        Answer one HTTP request body: a JSON-RPC request or batch. Fires
        with the response body, or None when nothing is to be answered
        (only notifications). Never fails.
        """
        try:
            message = json.loads(body, parse_constant=_refuseConstant)
        except (ValueError, RecursionError):
            return defer.succeed(
                _encode(_errorResponse(None, RPCError(PARSE_ERROR, "Parse error")))
            )
        if isinstance(message, list):
            if not message:
                return defer.succeed(
                    _encode(_errorResponse(None, RPCError(INVALID_REQUEST, "Invalid Request")))
                )
            if len(message) > MAX_BATCH_REQUESTS:
                error = RPCError(
                    INVALID_REQUEST,
                    f"Invalid Request: batch of {len(message)} requests;"
                    f" at most {MAX_BATCH_REQUESTS}",
                )
                return defer.succeed(_encode(_errorResponse(None, error)))
            batch = [self._answer(m) for m in message]

            def collect(answers: list[bytes | None]) -> bytes | None:
                kept = [a for a in answers if a is not None]
                return b"[" + b",".join(kept) + b"]" if kept else None

            return defer.gatherResults(batch).addCallback(collect)
        return self._answer(message)

    def _answer(self, message: object) -> Deferred[bytes | None]:
        """The encoded response to one request, or None for a notification. Never fails."""
        if not isinstance(message, dict):
            return defer.succeed(
                _encode(_errorResponse(None, RPCError(INVALID_REQUEST, "Invalid Request")))
            )
        hasID = "id" in message
        requestID = message.get("id")
        if hasID and not _validID(requestID):
            invalid = RPCError(INVALID_REQUEST, "Invalid Request: bad id")
            return defer.succeed(_encode(_errorResponse(None, invalid)))
        problem = _checkRequest(message)
        if problem is not None:
            invalid = RPCError(INVALID_REQUEST, f"Invalid Request: {problem}")
            return defer.succeed(_encode(_errorResponse(requestID, invalid)))
        name = message["method"]
        d = self.call(name, message.get("params", []))

        def result(value: Any) -> bytes | None:
            if not hasID:
                return None
            try:
                return _encode({"jsonrpc": "2.0", "result": value, "id": requestID})
            except (TypeError, ValueError):
                self.log.failure("RPC method {method} answered what JSON cannot hold", method=name)
                internal = RPCError(INTERNAL_ERROR, "Internal error")
                return _encode(_errorResponse(requestID, internal))

        def error(failure: Failure) -> bytes | None:
            failure.trap(RPCError)
            if not hasID:
                return None
            return _encode(_errorResponse(requestID, cast(RPCError, failure.value)))

        return d.addCallbacks(result, error)

    # -- system.*

    def listMethods(self) -> list[str]:
        """C{system.listMethods}: every method name, sorted."""
        return sorted(self.methods)

    def methodHelp(self, name: str) -> str:
        """C{system.methodHelp}: a method's help line."""
        method = self.methods.get(name)
        if method is None:
            raise RPCError(400, "command not found")
        return method.help

    # -- dmq.*

    def _registerDMQ(self) -> None:
        self.register(RPCMethod("dmq.list_nodes", self.listNodes, help="Print all nodes"))
        self.register(
            RPCMethod(
                "dmq.remove",
                self.removeNode,
                (Param("uri"),),
                help="Remove a DMQ node",
                tooFew=RPCError(KAMAILIO_FAULT, INVALID_PARAMETERS),
            )
        )
        self.register(
            RPCMethod(
                "dmq.add",
                self.addNode,
                (Param("uri"),),
                help="Add a DMQ node",
                tooFew=RPCError(KAMAILIO_FAULT, INVALID_PARAMETERS),
            )
        )
        self.register(
            RPCMethod(
                "dmq.change_status",
                self.changeStatus,
                (Param("uri"), Param("status")),
                help="Change the status of a DMQ node",
                tooFew=RPCError(KAMAILIO_FAULT, INVALID_PARAMETERS),
            )
        )
        self.register(
            RPCMethod(
                "dmq.stats",
                self.busStats,
                help="Counters of every layer, peers, node counts and open transactions",
            )
        )

    def listNodes(self) -> list[dict[str, Any]]:
        """
        C{dmq.list_nodes}: every node, newest first, the local node last,
        as Kamailio's entries (see L{nodeEntry}).
        """
        return [nodeEntry(n) for n in self.bus.nodes()]

    def removeNode(self, uri: str) -> str:
        """
        C{dmq.remove}: drop the non-local node C{uri} names (host, port and
        transport; user and other parameters ignored). Answers ok also when
        nothing matched or C{uri} is this node, as Kamailio does; a node
        that is alive comes back with its next notification.
        @raise RPCError: C{500 Failure} when C{uri} is not a SIP URI.
        """
        try:
            parsed = SIPURI.parse(uri)
        except SIPParseError:
            raise RPCError(KAMAILIO_FAULT, FAILURE) from None
        node = self.bus.nodeList.find(parsed)
        if node is not None and self.bus.nodeList.remove(node.key) is not None:
            self.log.info("node {node} removed through the control API", node=str(node))
        return REMOVE_OK

    def addNode(self, uri: str) -> str:
        """
        C{dmq.add} (Kamailio 6.x): add the node C{uri} names (host, port,
        transport) to the list, as C{pending} unless the URI has a
        C{;status=} word (C{active}, C{pending}, C{disabled}, C{timeout} or
        C{not_active}). A pending node is pinged with every other node each
        ping interval: its first 200 makes it active (and listed to the
        bus, and sent broadcasts); if it does not answer it is disabled,
        then removed, as any node. Kamailio 6.x adds it C{active} at once
        (6.1 has no pending state); we do not vouch for a node to the bus
        before it has answered us. A node held back after a failure (see
        L{dmq_bus.bus.nodelist.NodeList.remove}) is released.
        @raise RPCError: C{500 Node is already added} when the list has a
            node of that identity (this node included); C{500 Failure} when
            C{uri} is not a SIP URI, its host not an IP literal, its
            transport or status unknown, or the node list is full (the
            reason in C{data}).
        """
        try:
            parsed = SIPURI.parse(uri)
        except SIPParseError:
            raise RPCError(KAMAILIO_FAULT, FAILURE, "not a SIP URI") from None
        nodeList = self.bus.nodeList
        if nodeList.find(parsed) is not None:
            raise RPCError(KAMAILIO_FAULT, NODE_ALREADY_ADDED)
        if not isIPLiteral(parsed.host):
            raise RPCError(KAMAILIO_FAULT, FAILURE, "the host must be an IP address")
        transport = parsed.param("transport")
        if transport is not None and transport.lower() not in NODE_TRANSPORTS:
            raise RPCError(KAMAILIO_FAULT, FAILURE, f"unknown transport {transport!r}")
        word = parsed.param("status")
        status = NodeStatus.PENDING if word is None else NodeStatus.fromWord(word)
        if status is None:
            raise RPCError(KAMAILIO_FAULT, FAILURE, f"unknown status {word!r}")
        node = Node.fromURI(parsed, status)
        nodeList.forgive(node.key)
        if nodeList.add(node) is None:
            raise RPCError(
                KAMAILIO_FAULT, FAILURE, f"the node list is full ({nodeList.maxNodes} nodes)"
            )
        self.log.info(
            "node {node} added as {status} through the control API",
            node=str(node),
            status=status.word,
        )
        return ADD_OK

    def changeStatus(self, uri: str, word: str) -> str:
        """
        C{dmq.change_status} (Kamailio 6.x): set the status of the non-local
        node C{uri} names to C{word}: C{active}, C{disabled}, C{pending} or
        C{timeout} (C{not_active}, 6.1's word, is read as C{timeout}). The
        change is local and published as a membership event; the node list's
        rules apply from there on (a disabled node's next 200 makes it
        active again, a failed ping disables it). Answers, as Kamailio 6.x:
        C{Ok. DMQ node status changed.}, or C{Ok. DMQ node status is
        already WORD.} when nothing changes.
        @raise RPCError: C{500 Invalid Status - use: ...} for another word
            (checked first, as Kamailio does); C{500 Node Not Found} when
            no node matches (also for a C{uri} that does not parse);
            C{500 Node is local} for this node.
        """
        status = NodeStatus.fromWord(word)
        if status is None:
            raise RPCError(KAMAILIO_FAULT, INVALID_STATUS)
        try:
            node = self.bus.nodeList.find(SIPURI.parse(uri))
        except SIPParseError:
            node = None
        if node is None:
            raise RPCError(KAMAILIO_FAULT, NODE_NOT_FOUND)
        if node.local:
            raise RPCError(KAMAILIO_FAULT, NODE_IS_LOCAL)
        if node.status is status:
            return STATUS_ALREADY.format(word=word)
        self.bus.nodeList.setStatus(node.key, status)
        self.log.info(
            "node {node} set {status} (was {previous}) through the control API",
            node=str(node),
            status=status.word,
            previous=node.status.word,
        )
        return STATUS_CHANGED

    def _nodesPerStatus(self) -> dict[str, int]:
        """How many nodes have each status word, the local node included."""
        perStatus: Counter[str] = Counter({s.word: 0 for s in NodeStatus})
        perStatus.update(n.status.word for n in self.bus.nodes())
        return dict(perStatus)

    def busStats(self) -> dict[str, Any]:
        """
        C{dmq.stats} (ours): C{node} (the local URI), C{counters} (every
        counter and gauge of every layer), C{peers} (C{channel},
        C{description}, in registration order), C{nodes} (how many nodes
        per status word, the local node included, and C{total}),
        C{transactions} (C{client_open}, C{server_open}), C{events}
        (the C{/events} stream: C{clients}, C{backlog} and its counters)
        and C{observed} (per observed Kamailio channel, its
        L{IObservedChannel.summary}: counts and the last items).
        """
        counters = dict(self.stats())
        perStatus = self._nodesPerStatus()
        nodes = self.bus.nodes()
        return {
            "node": str(self.bus.localNode.uri),
            "counters": counters,
            "peers": [
                {"channel": str(p.channel), "description": str(p.description)}
                for p in self.bus.peers()
            ],
            "nodes": dict(perStatus) | {"total": len(nodes)},
            "transactions": {
                "client_open": counters.get("transactions.client_open", 0),
                "server_open": counters.get("transactions.server_open", 0),
            },
            "events": {"clients": self.events.clientCount, "backlog": self.events.backlog}
            | {name.removeprefix("events."): n for name, n in sorted(self.events.counters.items())},
            "observed": {
                str(p.channel): IObservedChannel(p).summary()
                for p in self.bus.peers()
                if IObservedChannel.providedBy(p)
            },
        }

    # -- metrics

    def metricFamilies(self) -> list[metrics.MetricFamily]:
        """
        What C{GET /metrics} shows: every counter of L{stats} and of the
        event stream through L{dmq_bus.metrics.FAMILIES}, and gauges of the
        node's state: nodes per status (the local node included), cells
        per table, completed transactions kept, event stream clients and
        backlog, and C{dmq_node_info}.
        """
        counters: dict[str, float] = dict(self.stats())
        counters.update(self.events.counters)
        state: dict[str, list[metrics.Sample]] = {
            "dmq_nodes": [((("status", w),), n) for w, n in self._nodesPerStatus().items()],
            "dmq_events_clients": [((), self.events.clientCount)],
            "dmq_events_backlog": [((), self.events.backlog)],
            "dmq_node_info": [
                ((("uri", str(self.bus.localNode.uri)), ("version", __version__)), 1)
            ],
        }
        if self.tables is not None:
            state["dmq_htable_cells"] = [
                ((("table", t.name),), len(t)) for t in self.tables.tables()
            ]
        completed: list[metrics.Sample] = []
        for side, attribute in (
            ("client", "completedClientTransactions"),
            ("server", "completedServerTransactions"),
        ):
            # the transaction layer's statistics, where the bus runs on one
            value = getattr(self.bus.client, attribute, None)
            if isinstance(value, int):
                completed.append(((("side", side),), value))
        state["dmq_sip_transactions_completed"] = completed
        return metrics.collect(counters, state)

    # -- htable.*

    def _registerHashTables(self) -> None:
        table, key = Param("htname"), Param("key")
        for method in (
            RPCMethod(
                "htable.get",
                self.tableGet,
                (table, key),
                help="Get one key from a hash table.",
                tooFew=RPCError(KAMAILIO_FAULT, "Not enough parameters (htable name and key name)"),
            ),
            RPCMethod(
                "htable.sets",
                self.tableSetString,
                (table, key, Param("value")),
                help="Set one key in a hash table to a string value.",
                tooFew=RPCError(
                    KAMAILIO_FAULT, "Not enough parameters (htable name, key name and value)"
                ),
            ),
            RPCMethod(
                "htable.seti",
                self.tableSetInteger,
                (table, key, Param("value", int)),
                help="Set one key in a hash table to an integer value.",
                tooFew=RPCError(
                    KAMAILIO_FAULT, "Not enough parameters (htable name, key name and value)"
                ),
            ),
            RPCMethod(
                "htable.setex",
                self.tableSetExpire,
                (table, key, Param("expire", int)),
                help="Set expire in a hash table for the item referenced by key.",
                tooFew=RPCError(
                    KAMAILIO_FAULT, "Not enough parameters (htable name, item name and expire)"
                ),
            ),
            RPCMethod(
                "htable.delete",
                self.tableDelete,
                (table, key),
                help="Delete one key from a hash table.",
                # sic: Kamailio's message lacks the closing parenthesis
                tooFew=RPCError(KAMAILIO_FAULT, "Not enough parameters (htable name & key name"),
            ),
            RPCMethod(
                "htable.dump",
                self.tableDump,
                (table,),
                help="Dump the contents of hash table.",
                tooFew=RPCError(KAMAILIO_FAULT, "No htable name given"),
            ),
            RPCMethod(
                "htable.reload",
                self.tableReload,
                (table,),
                help="Reload hash table from database.",
                tooFew=RPCError(KAMAILIO_FAULT, "No htable db_url"),
            ),
            RPCMethod("htable.stats", self.tableStats, help="Statistics about htables."),
            RPCMethod("htable.listTables", self.listTables, help="List all htables."),
        ):
            self.register(method)

    def _allTables(self) -> list[IHashTable]:
        """
        Every table, in Kamailio's order (the last declared first: its
        htable module prepends each table to its list).
        @raise RPCError: C{500 No htables} when there is none.
        """
        tables = [] if self.tables is None else list(reversed(self.tables.tables()))
        if not tables:
            raise RPCError(KAMAILIO_FAULT, NO_HTABLES)
        return tables

    def tableStats(self) -> list[dict[str, Any]]:
        """
        C{htable.stats}: per table, Kamailio 5.6.3's C{{name, slots, all,
        min, max}}: the number of slots, of cells, and the fewest and most
        cells in one slot, with the cells placed in slots as Kamailio places
        them (see L{KAMAILIO_HTABLE_SLOTS}); so the same keys give the same
        answer on both.
        """
        answer = []
        for table in self._allTables():
            perSlot = Counter(
                kamailioHash(key) & (KAMAILIO_HTABLE_SLOTS - 1) for key, _, _ in table.items()
            )
            counts = list(perSlot.values())
            answer.append(
                {
                    "name": table.name,
                    "slots": KAMAILIO_HTABLE_SLOTS,
                    "all": sum(counts),
                    "min": min(counts) if len(perSlot) == KAMAILIO_HTABLE_SLOTS else 0,
                    "max": max(counts, default=0),
                }
            )
        return answer

    def listTables(self) -> list[dict[str, Any]]:
        """
        C{htable.listTables}: per table, Kamailio 5.6.3's C{{name, dbtable,
        dbmode, expire, updateexpire, size, dmqreplicate}}. Ours have no
        database (C{dbtable} empty, C{dbmode} 0), renew the expiry on every
        set (C{updateexpire} 1) and have L{KAMAILIO_HTABLE_SLOTS} slots.
        """
        return [
            {
                "name": table.name,
                "dbtable": "",
                "dbmode": 0,
                "expire": int(table.defaultExpire),
                "updateexpire": 1,
                "size": KAMAILIO_HTABLE_SLOTS,
                "dmqreplicate": 1 if _replicates(table) else 0,
            }
            for table in self._allTables()
        ]

    def _table(self, name: str) -> IHashTable:
        table = None if self.tables is None else self.tables.table(name)
        if table is None:
            raise RPCError(KAMAILIO_FAULT, NO_SUCH_HTABLE)
        return table

    def tableGet(self, name: str, key: str) -> dict[str, Any]:
        """
        C{htable.get}: C{{"item": {name, value, flags, expire}}}; C{flags}
        is 2 for a string, 0 for an integer; C{expire} is C{NEVER} or the
        local time it expires. Costs one pass over the table (to find the
        expiry), which is fine for an operator's call.
        @raise RPCError: C{500} for an unknown table or key.
        """
        table = self._table(name)
        value = table.get(key)
        if value is None:
            raise RPCError(KAMAILIO_FAULT, KEY_NOT_FOUND_GET)
        expiresAt = next((at for k, _, at in table.items() if k == key), 0.0)
        return {
            "item": {
                "name": key,
                "value": value,
                "flags": 2 if isinstance(value, str) else 0,
                "expire": formatExpire(expiresAt),
            }
        }

    def tableSetString(self, name: str, key: str, value: str) -> str:
        """C{htable.sets}: set a string value (replicated to the bus)."""
        return self._set(name, key, value)

    def tableSetInteger(self, name: str, key: str, value: int) -> str:
        """
        C{htable.seti}: set an integer value (replicated to the bus).
        @raise RPCError: C{-32602} for a value outside 32 bits.
        """
        if value not in INT32:
            raise invalidParams(f"value {value} is outside the 32-bit signed range")
        return self._set(name, key, value)

    def _set(self, name: str, key: str, value: str | int) -> str:
        table = self._table(name)
        try:
            table.set(key, value)
        except ValueError as e:
            raise RPCError(KAMAILIO_FAULT, SET_FAILED, str(e)) from None
        return SET_OK

    def tableSetExpire(self, name: str, key: str, expire: int) -> str:
        """
        C{htable.setex}: give C{key} C{expire} more seconds of life
        (replicated). Answers C{Ok} also when the key is absent, as
        Kamailio does.
        """
        table = self._table(name)
        try:
            table.setExpire(key, float(expire))
        except ValueError as e:
            raise RPCError(KAMAILIO_FAULT, SET_FAILED, str(e)) from None
        return SETEX_OK

    def tableDelete(self, name: str, key: str) -> str:
        """
        C{htable.delete}: remove C{key} (replicated).
        @raise RPCError: C{404} when it is absent, C{500} for an unknown table.
        """
        if not self._table(name).delete(key):
            raise RPCError(404, KEY_NOT_FOUND_DELETE)
        return DELETE_OK

    def tableDump(self, name: str) -> list[dict[str, Any]]:
        """
        C{htable.dump}: the cells grouped in Kamailio's slots (see
        L{KAMAILIO_HTABLE_SLOTS}), slots in ascending order:
        C{[{entry, size, slot: [{name, value, type: "str" | "int"}]}]}.
        """
        slots: dict[int, list[tuple[int, str, str | int]]] = {}
        for key, value, _ in self._table(name).items():
            full = kamailioHash(key)
            slots.setdefault(full & (KAMAILIO_HTABLE_SLOTS - 1), []).append((full, key, value))
        dump = []
        for entry in sorted(slots):
            cells = sorted(slots[entry], key=lambda cell: (cell[0], cell[1]))
            dump.append(
                {
                    "entry": entry,
                    "size": len(cells),
                    "slot": [
                        {"name": k, "value": v, "type": "str" if isinstance(v, str) else "int"}
                        for _, k, v in cells
                    ],
                }
            )
        return dump

    def tableReload(self, name: str) -> str:
        """
        C{htable.reload}: our tables live only in memory, with no database
        to reload from: always Kamailio's answer for a node without
        C{db_url}, C{500 No htable db_url}.
        """
        raise RPCError(KAMAILIO_FAULT, "No htable db_url")


def _replicates(table: IHashTable) -> bool:
    """
    Whether C{table} replicates over DMQ: its C{spec.replicate} when it has
    one (L{dmq_bus.peers.htable.HashTable}), else True (IHashTable does not
    say).
    """
    spec = getattr(table, "spec", None)
    return bool(getattr(spec, "replicate", True))


def _refuseConstant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _validID(value: object) -> bool:
    return value is None or (isinstance(value, str | int | float) and not isinstance(value, bool))


def _checkRequest(message: dict[str, Any]) -> str | None:
    """What makes C{message} not a JSON-RPC 2.0 request, or None."""
    if message.get("jsonrpc") != "2.0":
        return 'jsonrpc must be "2.0"'
    if not isinstance(message.get("method"), str):
        return "method must be a string"
    if "params" in message and not isinstance(message["params"], list | dict):
        return "params must be an array or an object"
    return None


def _errorResponse(requestID: Any, error: RPCError) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "error": error.toJSON(), "id": requestID}


def _encode(value: Any) -> bytes:
    # ASCII JSON: strings holding undecodable bytes (surrogateescape) stay valid
    return json.dumps(value, separators=(",", ":")).encode("ascii")


class BoundedBody(io.BytesIO):
    """
    A request body that keeps at most C{limit + 1} bytes and drops the
    rest, so an oversized body costs no memory and is still seen as
    oversized.
    """

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.received = 0

    def write(self, data: Any) -> int:
        data = bytes(data)
        room = self.limit + 1 - self.received
        if room > 0:
            super().write(data[:room])
        self.received += len(data)
        return len(data)


# ---------------------------------------------------------------------------
# GET /events: membership changes as Server-Sent Events


def membershipEventData(event: MembershipEvent, when: float) -> dict[str, Any]:
    """
    The C{data} of one C{membership} event: C{change} (C{added},
    C{status}, C{removed}), C{node} (its URI), C{status} (its status word
    after the change; for a removal, the last it had), C{previous} (the
    word before a C{status} change, else null) and C{time} (clock seconds).
    """
    return {
        "change": event.change.value,
        "node": str(event.node.uri),
        "status": event.node.status.word,
        "previous": None if event.previous is None else event.previous.word,
        "time": when,
    }


def _disconnected(request: Request) -> bool:
    """Whether C{request}'s connection is gone (twisted.web sets C{_disconnected})."""
    return bool(getattr(request, "_disconnected", False))


def _abort(request: Request) -> None:
    """Drop C{request}'s connection at once, unsent data included."""
    transport = getattr(getattr(request, "channel", None), "transport", None)
    abort = getattr(transport, "abortConnection", None)
    if callable(abort):
        abort()
    else:
        request.loseConnection()


@implementer(IPushProducer)
class EventClient:
    """
    One C{/events} client: a push producer registered on its request, so
    that the connection tells it when to pause. While paused (or while
    anything waits), what it is given waits in its backlog.

    @ivar backlog: writes waiting for the connection to take them.
    @ivar paused: whether the connection asked for a pause.
    """

    def __init__(self, request: Request, stream: MembershipEvents) -> None:
        self.request = request
        self.stream = stream
        self.backlog: deque[bytes] = deque()
        self.paused = False

    def send(self, data: bytes) -> bool:
        """
        Write C{data}, or queue it while the connection cannot take it.
        False when the backlog is over the stream's C{maxBacklog}: the
        client has fallen too far behind.
        """
        if self.paused or self.backlog:
            self.backlog.append(data)
            return len(self.backlog) <= self.stream.maxBacklog
        self.request.write(data)
        return True

    def pauseProducing(self) -> None:
        """The connection's buffer is full: queue from now on."""
        self.paused = True

    def resumeProducing(self) -> None:
        """The connection can take more: write the backlog, oldest first."""
        self.paused = False
        while self.backlog and not self.paused:
            self.request.write(self.backlog.popleft())

    def stopProducing(self) -> None:
        """The connection is gone."""
        self.stream.detach(self)


class MembershipEvents:
    """
    The membership changes of one node, fanned out to the C{GET /events}
    clients as Server-Sent Events (C{text/event-stream}). Each change is
    one event::

        id: 7
        event: membership
        data: {"change":"status","node":"sip:10.0.0.2:5060","status":"disabled",
               "previous":"active","time":1764412345.5}

    (C{data} on one line; see L{membershipEventData}); C{id} counts the
    events of this stream from 1. Every C{heartbeat} seconds each client
    gets a comment line C{: heartbeat}. There is no replay: a client that
    reconnects (C{Last-Event-ID} is ignored) gets the changes from then
    on; read C{dmq.list_nodes} for the current state.

    The stream observes the bus only while it has clients. Each client has
    its own queue, bounded by C{maxBacklog} (see L{MAX_EVENT_BACKLOG});
    at most C{maxClients} clients at once (see L{MAX_EVENT_CLIENTS}).
    A client is removed when it disconnects.

    @ivar counters: C{events.sent} (writes of an event to a client),
        C{events.clients_accepted}, C{events.clients_refused_limit},
        C{events.clients_dropped_slow}.
    """

    log = Logger()

    def __init__(
        self,
        subscribe: Callable[[Callable[[MembershipEvent], None]], Callable[[], None]],
        clock: IReactorTime,
        heartbeat: float = HEARTBEAT_INTERVAL,
        maxBacklog: int = MAX_EVENT_BACKLOG,
        maxClients: int = MAX_EVENT_CLIENTS,
    ) -> None:
        self.subscribe = subscribe
        self.clock = clock
        self.heartbeat = heartbeat
        self.maxBacklog = maxBacklog
        self.maxClients = maxClients
        self.counters: Counter[str] = Counter()
        self._clients: list[EventClient] = []
        self._unsubscribe: Callable[[], None] | None = None
        self._beating: LoopingCall | None = None
        self._lastID = 0

    @property
    def clientCount(self) -> int:
        """How many clients are connected."""
        return len(self._clients)

    @property
    def backlog(self) -> int:
        """How many writes wait in the clients' queues, all clients together."""
        return sum(len(c.backlog) for c in self._clients)

    def attach(self, request: Request) -> EventClient | None:
        """
        Start the event stream on C{request} (headers and a first comment
        are written at once). None, and nothing written, when
        C{maxClients} clients are connected already.
        """
        if len(self._clients) >= self.maxClients:
            self.counters["events.clients_refused_limit"] += 1
            return None
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-accel-buffering", b"no")
        # the stream is quiet between changes: no idle timeout (heartbeats and
        # the backlog limit look after it)
        setTimeout = getattr(getattr(request, "channel", None), "setTimeout", None)
        if callable(setTimeout):
            setTimeout(None)
        client = EventClient(request, self)
        request.registerProducer(client, True)
        request.write(b": dmq-bus membership events\n\n")
        self._clients.append(client)
        self.counters["events.clients_accepted"] += 1
        request.notifyFinish().addBoth(lambda _: self.detach(client))
        if self._unsubscribe is None:
            self._unsubscribe = self.subscribe(self.publish)
        if self._beating is None:
            self._beating = LoopingCall(self._beat)
            self._beating.clock = self.clock
            self._beating.start(self.heartbeat, now=False)
        return client

    def detach(self, client: EventClient) -> None:
        """Forget C{client} (it disconnected or is dropped); idempotent."""
        if client not in self._clients:
            return
        self._clients.remove(client)
        client.backlog.clear()
        request = client.request
        if getattr(request, "producer", None) is client and not _disconnected(request):
            request.unregisterProducer()
        if not self._clients:
            self._idle()

    def _idle(self) -> None:
        """No client left: stop observing the bus and beating."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._beating is not None:
            if self._beating.running:
                self._beating.stop()
            self._beating = None

    def publish(self, event: MembershipEvent) -> None:
        """Send C{event} to every client (the bus's membership observer)."""
        self._lastID += 1
        data = json.dumps(membershipEventData(event, self.clock.seconds()), separators=(",", ":"))
        self._sendAll(f"id: {self._lastID}\nevent: membership\ndata: {data}\n\n".encode())
        self.counters["events.sent"] += len(self._clients)

    def _beat(self) -> None:
        self._sendAll(b": heartbeat\n\n")

    def _sendAll(self, data: bytes) -> None:
        for client in list(self._clients):
            if not client.send(data):
                self._drop(client)

    def _drop(self, client: EventClient) -> None:
        """Disconnect a client that fell more than C{maxBacklog} writes behind."""
        self.counters["events.clients_dropped_slow"] += 1
        self.log.warn(
            "events client disconnected: more than {limit} writes behind", limit=self.maxBacklog
        )
        self.detach(client)
        _abort(client.request)

    def close(self) -> None:
        """End every stream (the service stops): finish each response and close."""
        for client in list(self._clients):
            self.detach(client)
            request = client.request
            if not _disconnected(request):
                channel = getattr(request, "channel", None)
                request.finish()
                if channel is not None:  # no keep-alive: the stream had no idle timeout
                    channel.loseConnection()


class ControlResource(Resource):
    """
    C{/RPC}: JSON-RPC 2.0 over HTTP POST. Answers 200 with the JSON
    response, 204 when there is none (notifications only), 413 for a body
    over C{maxBody} bytes, 405 for any other HTTP method.
    """

    isLeaf = True
    log = Logger()

    def __init__(self, api: ControlAPI, maxBody: int = MAX_REQUEST_BODY) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.api = api
        self.maxBody = maxBody

    def render_POST(self, request: Request) -> bytes | int:
        body = request.content.read(self.maxBody + 1) if request.content is not None else b""
        if len(body) > self.maxBody:
            request.setResponseCode(413)
            request.setHeader(b"content-type", b"application/json")
            error = RPCError(
                INVALID_REQUEST, f"Invalid Request: body larger than {self.maxBody} bytes"
            )
            return _encode(_errorResponse(None, error))
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)

        def respond(answer: bytes | None) -> None:
            if gone:
                return
            if answer is None:
                request.setResponseCode(204)
            else:
                request.setHeader(b"content-type", b"application/json")
                request.write(answer)
            request.finish()

        def failed(failure: Failure) -> None:
            self.log.failure("control API request failed", failure)
            if not gone:
                request.setResponseCode(500)
                request.finish()

        self.api.handle(body).addCallback(respond).addErrback(failed)
        return NOT_DONE_YET


class MetricsResource(Resource):
    """C{GET /metrics}: the node's metrics in Prometheus text format 0.0.4."""

    isLeaf = True

    def __init__(self, api: ControlAPI) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.api = api

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", metrics.CONTENT_TYPE)
        return metrics.render(self.api.metricFamilies())


class EventsResource(Resource):
    """
    C{GET /events}: the membership event stream (see L{MembershipEvents});
    C{503} past the client limit.
    """

    isLeaf = True

    def __init__(self, events: MembershipEvents) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.events = events

    def render_GET(self, request: Request) -> bytes | int:
        if self.events.attach(request) is None:
            request.setResponseCode(503)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return f"too many event clients (at most {self.events.maxClients})\n".encode()
        return NOT_DONE_YET

    def render_HEAD(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        return b""


def makeControlResource(api: ControlAPI, maxBody: int = MAX_REQUEST_BODY) -> Resource:
    """
    The site root: L{ControlResource} at C{/RPC}, L{MetricsResource} at
    C{/metrics}, L{EventsResource} at C{/events}, 404 elsewhere.
    """
    root = Resource()
    root.putChild(RPC_PATH, ControlResource(api, maxBody))
    root.putChild(METRICS_PATH, MetricsResource(api))
    root.putChild(EVENTS_PATH, EventsResource(api.events))
    return root


class ControlSite(Site):
    """A L{Site} whose request bodies are bounded (see L{BoundedBody})."""

    noisy = False

    def __init__(self, api: ControlAPI, maxBody: int = MAX_REQUEST_BODY) -> None:
        super().__init__(makeControlResource(api, maxBody), timeout=IDLE_TIMEOUT)  # type: ignore[no-untyped-call]
        self.maxBody = maxBody

    def getContentFile(self, length: int | None) -> BoundedBody:
        """Where a request body goes (called by L{Request.gotLength})."""
        return BoundedBody(self.maxBody)

    def log(self, request: Any) -> None:
        """
        Access log at DEBUG only: scrapes and dmq-ctl calls are not news
        (twisted.web writes one INFO line per request otherwise).
        """
        self._accessLog.debug(
            "{method} {path} -> {code}",
            method=request.method.decode("ascii", "replace"),
            path=request.uri.decode("ascii", "replace"),
            code=request.code,
        )

    _accessLog = Logger()


class ControlService(Service):
    """
    Serves a L{ControlAPI} on a Twisted server endpoint (an endpoint or an
    endpoint string such as L{DEFAULT_CONTROL_ENDPOINT}). Starting fails at
    once when the endpoint cannot listen synchronously (a TCP port in use).
    """

    log = Logger()

    def __init__(
        self,
        api: ControlAPI,
        endpoint: str | IStreamServerEndpoint = DEFAULT_CONTROL_ENDPOINT,
        reactor: Any = None,
        maxBody: int = MAX_REQUEST_BODY,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as globalReactor

            reactor = globalReactor
        self.api = api
        self.endpoint = (
            serverFromString(reactor, endpoint) if isinstance(endpoint, str) else endpoint
        )
        self.description = endpoint if isinstance(endpoint, str) else repr(endpoint)
        self.maxBody = maxBody
        self.port: IListeningPort | None = None
        self._waiting: list[Deferred[IListeningPort]] = []
        self._failure: Failure | None = None
        self._starting = False

    def whenListening(self) -> Deferred[IListeningPort]:
        """Fires with the listening port once the service listens."""
        if self.port is not None:
            return defer.succeed(self.port)
        if self._failure is not None:
            return defer.fail(self._failure)
        d: Deferred[IListeningPort] = Deferred()
        self._waiting.append(d)
        return d

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._failure = None
        self._starting = True
        try:
            listening = self.endpoint.listen(ControlSite(self.api, self.maxBody))
            listening.addCallbacks(self._listening, self._notListening)
        finally:
            self._starting = False
        if self._failure is not None:
            self.running = False
            self._failure.raiseException()

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        address = port.getHost()
        host = getattr(address, "host", None)
        self.log.info("control API (JSON-RPC) listening on {address}", address=str(address))
        if host is not None and not _isLoopback(host):
            self.log.warn(
                "control API on {host} is reachable beyond this host and has no authentication",
                host=host,
            )
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(port)

    def _notListening(self, failure: Failure) -> None:
        self._failure = failure
        if not self._starting:  # a synchronous failure is raised by startService instead
            self.log.failure(
                "control API cannot listen on {endpoint}", failure, endpoint=self.description
            )
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(failure)

    def stopService(self) -> Deferred[None] | None:
        """Stop listening; end the C{/events} streams."""
        super().stopService()  # type: ignore[no-untyped-call]
        self.api.events.close()
        port, self.port = self.port, None
        if port is None:
            return None
        return defer.maybeDeferred(port.stopListening).addCallback(lambda _: None)


def _isLoopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
