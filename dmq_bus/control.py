"""
The control API: JSON-RPC 2.0 over HTTP at C{POST /RPC}, speaking Kamailio
5.6.3's RPC method names, result shapes, error codes and error messages
(as its C{jsonrpcs} module answers them; the captured answers are in
C{tests/test_control.py}), so what works against C{kamcmd}/C{jsonrpcs} on a
Kamailio node works against a dmq-bus node too.

Methods (see L{ControlAPI}): C{dmq.list_nodes}, C{dmq.remove}, C{dmq.stats}
(ours), and, when the node holds hash tables, C{htable.get}, C{htable.sets},
C{htable.seti}, C{htable.setex}, C{htable.delete}, C{htable.dump},
C{htable.reload}; plus C{system.listMethods} and C{system.methodHelp}.

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
    node's last notification (Kamailio 5.6.3 always gives 0).
"""

from __future__ import annotations

import io
import ipaddress
import json
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import attrs
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from dmq_bus.bus.dispatch import DMQBus
from dmq_bus.bus.values import Node, NodeStatus, isIPLiteral
from dmq_bus.interfaces import IHashTable, IHashTables
from dmq_bus.sip.errors import SIPParseError
from dmq_bus.sip.uri import SIPURI, stripBrackets

DEFAULT_CONTROL_ENDPOINT = "tcp:8060:interface=127.0.0.1"
"""Where the control API listens unless told otherwise (a Twisted endpoint string)."""

RPC_PATH = b"RPC"
"""The one path the API answers on: C{/RPC}, as Kamailio's xhttp_rpc/jsonrpcs."""

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
    them. Add methods with L{register}; nothing here blocks.

    @ivar methods: the registry, method name -> L{RPCMethod}.
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
                tooFew=RPCError(KAMAILIO_FAULT, "Invalid Parameters"),
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
            raise RPCError(KAMAILIO_FAULT, "Failure") from None
        node = self.bus.nodeList.find(parsed)
        if node is not None and self.bus.nodeList.remove(node.key) is not None:
            self.log.info("node {node} removed through the control API", node=str(node))
        return REMOVE_OK

    def busStats(self) -> dict[str, Any]:
        """
        C{dmq.stats} (ours): C{node} (the local URI), C{counters} (every
        counter and gauge of every layer), C{peers} (C{channel},
        C{description}, in registration order), C{nodes} (how many nodes
        per status word, the local node included, and C{total}) and
        C{transactions} (C{client_open}, C{server_open}).
        """
        counters = dict(self.stats())
        perStatus: Counter[str] = Counter({s.word: 0 for s in NodeStatus})
        nodes = self.bus.nodes()
        perStatus.update(n.status.word for n in nodes)
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
        }

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
        ):
            self.register(method)

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


def makeControlResource(api: ControlAPI, maxBody: int = MAX_REQUEST_BODY) -> Resource:
    """The site root: L{ControlResource} at C{/RPC}, 404 elsewhere."""
    root = Resource()
    root.putChild(RPC_PATH, ControlResource(api, maxBody))
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
        super().stopService()  # type: ignore[no-untyped-call]
        port, self.port = self.port, None
        if port is None:
            return None
        return defer.maybeDeferred(port.stopListening).addCallback(lambda _: None)


def _isLoopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
