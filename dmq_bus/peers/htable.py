"""
The C{htable} peer: hash tables replicated over DMQ the way Kamailio 5.6.3's
htable module replicates its C{dmqreplicate=1} tables (C{enable_dmq=1}), so
dmq-bus nodes and Kamailio nodes share the same tables on one bus.

Three parts, each usable on its own:

  - the table specification (L{TableSpec}, L{parseTableSpec}): C{NAME[=OPTIONS]}
    with Kamailio's option syntax, C{kv=autoexpire=60;dmqreplicate=1};
  - the JSON codec (C{encode*}, L{decodeMessage}): byte for byte what
    Kamailio 5.6.3 sends, and a lenient decoder that accepts what it may send
    (duplicate keys, raw non-UTF-8 bytes inside strings);
  - the tables (L{HashTable}) and the peer that holds them (L{HTablePeer}),
    with every limit in L{HTableLimits}.

Wire facts (see the spec, §6.1): channel C{htable}, C{Content-Type:
application/json}, C{Max-Forwards: 1}; one action per request; a full copy
is asked for with C{{"action":1}} and sent back in C{{"cells":[...]}} chunks
of at most 60,000 bytes. A 5.6.3 receiver crashes on a body without a first
member (C{{}}, C{[1,2]}), so every body this module emits starts with
C{{"action":} or C{{"cells":}.
"""

from __future__ import annotations

import heapq
import importlib
import itertools
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer

from dmq_bus.bus.values import (
    BroadcastResult,
    Delivery,
    DMQMessage,
    MembershipChange,
    MembershipEvent,
    Node,
    NodeKey,
    NodeStatus,
    PeerResponse,
)
from dmq_bus.deadlines import Deadlines
from dmq_bus.interfaces import (
    IDMQBus,
    IDMQPeer,
    IDMQPeerFactory,
    IHashTable,
    IHashTables,
)
from dmq_bus.peers.srjson import readJSON

CHANNEL = "htable"
"""The DMQ channel (Kamailio's htable peer id)."""

CONTENT_TYPE = "application/json"
"""The content type of every htable message."""

DEFAULT_CHUNK_SIZE = 60_000
"""Largest sync chunk, in bytes of JSON (Kamailio's target size)."""

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1

Value = str | int
"""A cell value: C{str} (Kamailio type 2) or a 32-bit signed C{int} (type 0)."""

ChangeKind = Literal["set", "expire", "delete", "remove", "sync", "expired"]
ChangeOrigin = Literal["local", "remote", "sync"]

# Kamailio's htable DMQ actions (5.5 ... 5.8 numbering).
ACTION_NONE = 0
ACTION_SYNC = 1
ACTION_SET = 2
ACTION_SET_EXPIRE = 3
ACTION_DELETE = 4
ACTION_REMOVE_REGEX = 5
ACTION_REMOVE_PREFIX = 6

TYPE_INT = 0
TYPE_STR = 2

ACTION_KEYS = frozenset({"action", "htname", "cname", "type", "strval", "intval", "mode"})
"""The only keys a 5.6.3 receiver accepts in an action message (else 400)."""

_TOKEN = re.compile(r"[A-Za-z0-9_.\-]+\Z")


# ---------------------------------------------------------------------------
# Table specifications


@attrs.frozen
class TableSpec:
    """
    One table a node holds, as Kamailio declares it with C{modparam("htable",
    "htable", "NAME=>OPTIONS")}.

    @ivar name: the table name (Kamailio's htname); every node of the bus
        must declare the same names.
    @ivar autoexpire: seconds a cell lives after its last set; 0 = forever.
    @ivar replicate: whether writes go to (and come from) the bus
        (Kamailio's C{dmqreplicate}). A table that does not replicate answers
        remote writes with 500, like a table that does not exist.
    """

    name: str
    autoexpire: float = 0.0
    replicate: bool = True


_SPEC_OPTIONS = ("autoexpire", "dmqreplicate", "size")


def parseTableSpec(text: str) -> TableSpec:
    """
    Parse C{NAME[=OPTIONS]} (Kamailio's C{NAME=>OPTIONS} is accepted too),
    OPTIONS being C{;}-separated C{autoexpire=SECONDS}, C{dmqreplicate=0|1}
    and C{size=N} (accepted and ignored: Python dicts grow). Example:
    C{cache=autoexpire=60;dmqreplicate=1;size=10}.

    @raise ValueError: empty or non-token name, unknown option, bad value.
    """
    name, sep, options = text.strip().partition("=")
    if sep and options.startswith(">"):
        options = options[1:]
    name = name.strip()
    if not _TOKEN.match(name):
        raise ValueError(
            f"htable spec {text!r}: table name must be a non-empty token "
            "(letters, digits, '_', '-', '.')"
        )
    autoexpire = 0.0
    replicate = True
    for item in options.split(";"):
        item = item.strip()
        if not item:
            continue
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if key not in _SPEC_OPTIONS:
            raise ValueError(
                f"htable spec {text!r}: unknown option {key!r} (known: {', '.join(_SPEC_OPTIONS)})"
            )
        if not eq or not value:
            raise ValueError(f"htable spec {text!r}: option {key!r} needs a value")
        if key == "autoexpire":
            try:
                autoexpire = float(value)
            except ValueError:
                raise ValueError(
                    f"htable spec {text!r}: autoexpire must be a number of seconds, not {value!r}"
                ) from None
            if not math.isfinite(autoexpire) or autoexpire < 0 or autoexpire > INT32_MAX:
                raise ValueError(
                    f"htable spec {text!r}: autoexpire must be 0 or a positive number of seconds"
                )
        elif key == "dmqreplicate":
            if value not in ("0", "1"):
                raise ValueError(f"htable spec {text!r}: dmqreplicate must be 0 or 1")
            replicate = value == "1"
        elif not value.isdigit():
            raise ValueError(f"htable spec {text!r}: size must be a non-negative integer")
    return TableSpec(name, autoexpire, replicate)


def parseTableSpecs(text: str) -> list[TableSpec]:
    """
    Parse comma-separated table specs (C{kv,cache=autoexpire=60}).

    @raise ValueError: no table, a bad spec, or a name given twice.
    """
    specs = [parseTableSpec(part) for part in text.split(",") if part.strip()]
    if not specs:
        raise ValueError("htable: give at least one table, e.g. kv or kv,cache=autoexpire=60")
    names = [s.name for s in specs]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"htable: table {name!r} declared twice")
    return specs


# ---------------------------------------------------------------------------
# The JSON codec


def _buildEscapes() -> dict[int, bytes]:
    escapes = {
        0x22: b'\\"',
        0x5C: b"\\\\",
        0x08: b"\\b",
        0x0C: b"\\f",
        0x0A: b"\\n",
        0x0D: b"\\r",
        0x09: b"\\t",
    }
    for code in range(0x20):
        escapes.setdefault(code, b"\\u%04x" % code)
    return escapes


_ESCAPES = _buildEscapes()
_NEEDS_ESCAPE = re.compile(rb'["\\\x00-\x1f]')


def _escapeMatch(match: re.Match[bytes]) -> bytes:
    return _ESCAPES[match.group()[0]]


def valueBytes(text: str) -> bytes:
    """
    The bytes a string value stands for: UTF-8, with the C{surrogateescape}
    characters of non-UTF-8 input turned back into their raw bytes.

    @raise ValueError: the string holds a surrogate that is not a
        C{surrogateescape} one (it has no byte form).
    """
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as e:
        raise ValueError(f"string {text[:40]!r} holds a lone surrogate: {e}") from None


def jsonString(text: str) -> bytes:
    """
    A JSON string literal as Kamailio's srjson prints one: the bytes up to
    the first NUL (C strings end there), C{"} and C{\\} escaped, control
    characters as C{\\n \\r \\t \\b \\f} or C{\\u00XX}; C{/} and bytes
    ≥ 0x80 written raw (so values that are not UTF-8 go out as they came).
    """
    raw = valueBytes(text)
    nul = raw.find(b"\x00")
    if nul >= 0:
        raw = raw[:nul]
    if _NEEDS_ESCAPE.search(raw) is None:
        return b'"' + raw + b'"'
    return b'"' + _NEEDS_ESCAPE.sub(_escapeMatch, raw) + b'"'


def _valueMember(value: Value) -> bytes:
    if isinstance(value, int):
        return b'"type":0,"intval":%d' % value
    return b'"type":2,"strval":' + jsonString(value)


def encodeSyncRequest() -> bytes:
    """C{{"action":1}}: ask every node for a full copy of its tables."""
    return b'{"action":1}'


def encodeSet(table: str, key: str, value: Value) -> bytes:
    """Action 2 (SET_CELL): C{key} now holds C{value}."""
    return (
        b'{"action":2,"htname":'
        + jsonString(table)
        + b',"cname":'
        + jsonString(key)
        + b","
        + _valueMember(value)
        + b',"mode":1}'
    )


def encodeSetExpire(table: str, key: str, seconds: int) -> bytes:
    """Action 3 (SET_CELL_EXPIRE): C{key} expires C{seconds} from now."""
    return (
        b'{"action":3,"htname":'
        + jsonString(table)
        + b',"cname":'
        + jsonString(key)
        + b',"type":0,"intval":%d,"mode":0}' % seconds
    )


def encodeDelete(table: str, key: str) -> bytes:
    """Action 4 (DEL_CELL): remove C{key}."""
    return (
        b'{"action":4,"htname":'
        + jsonString(table)
        + b',"cname":'
        + jsonString(key)
        + b',"mode":0}'
    )


def encodeRemove(table: str, pattern: str, *, byValue: bool = False, prefix: bool = False) -> bytes:
    """
    Action 5 (RM_CELL_RE: keys or values matching regex C{pattern}) or 6
    (RM_CELL_SW, C{prefix}: starting with C{pattern}); mode 1 = values.
    """
    action = ACTION_REMOVE_PREFIX if prefix else ACTION_REMOVE_REGEX
    return (
        b'{"action":%d,"htname":' % action
        + jsonString(table)
        + b',"type":2,"strval":'
        + jsonString(pattern)
        + b',"mode":%d}' % (1 if byValue else 0)
    )


def encodeCell(table: str, key: str, value: Value, expire: int) -> bytes:
    """
    One cell of a sync chunk; C{expire} is the absolute Unix time at which
    it expires, 0 for never.
    """
    return (
        b'{"htname":'
        + jsonString(table)
        + b',"cname":'
        + jsonString(key)
        + b","
        + _valueMember(value)
        + b',"expire":%d}' % expire
    )


_CELLS_OPEN = b'{"cells":['
_CELLS_CLOSE = b"]}"
_CELLS_OVERHEAD = len(_CELLS_OPEN) + len(_CELLS_CLOSE)


def encodeCells(cells: Iterable[bytes]) -> bytes:
    """A sync chunk of already encoded cells (C{{"cells":[]}} when none)."""
    return _CELLS_OPEN + b",".join(cells) + _CELLS_CLOSE


def iterChunks(cells: Iterable[bytes], chunkSize: int = DEFAULT_CHUNK_SIZE) -> Iterator[bytes]:
    """
    Pack encoded cells into sync chunks of at most C{chunkSize} bytes each
    (unlike Kamailio, which starts a new chunk only after passing its target
    size), lazily: a cell is encoded only when its chunk is wanted. A cell
    too big for any chunk goes alone in one. Always at least one chunk:
    C{{"cells":[]}} for no cells, as Kamailio sends.
    """
    current: list[bytes] = []
    size = _CELLS_OVERHEAD
    for cell in cells:
        extra = len(cell) + (1 if current else 0)
        if current and size + extra > chunkSize:
            yield encodeCells(current)
            current = []
            size = _CELLS_OVERHEAD
            extra = len(cell)
        current.append(cell)
        size += extra
    yield encodeCells(current)


def chunkCells(cells: Iterable[bytes], chunkSize: int = DEFAULT_CHUNK_SIZE) -> list[bytes]:
    """Every chunk of L{iterChunks}, as a list."""
    return list(iterChunks(cells, chunkSize))


class MalformedMessage(ValueError):
    """
    A body Kamailio 5.6.3 answers with C{400 Bad Request}: missing,
    unparsable, not an object, empty object, or an action with a key it
    does not know.
    """


@attrs.frozen
class Action:
    """
    A decoded action message. Fields a 5.6.3 receiver would read as
    missing or unusable are None (the peer then answers 500).

    @ivar action: the action number; 0 (NONE) when absent or not a number.
    @ivar value: C{strval} when C{type} has Kamailio's string bit (2),
        else C{intval}; None when absent, of the wrong JSON type or outside
        the 32-bit range.
    """

    action: int
    htname: str | None = None
    cname: str | None = None
    value: Value | None = None
    mode: int = 0


@attrs.frozen
class Cell:
    """One cell of a sync chunk; C{expire} is absolute Unix time, 0 = never."""

    htname: str
    cname: str
    value: Value
    expire: int = 0


@attrs.frozen
class SyncCells:
    """A decoded sync chunk: the usable cells, and how many were not."""

    cells: tuple[Cell, ...]
    invalid: int = 0


_DECODER = json.JSONDecoder(strict=False)


def _cleanString(text: str) -> str:
    """
    A decoded string whose every character has a byte form: a lone surrogate
    that came from a C{\\uD8xx} escape is kept as the bytes of its
    UTF-8-style encoding (surrogateescape), so it can be written back.
    """
    try:
        text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "surrogateescape")
    return text


def _asInt(value: object, low: int = INT32_MIN, high: int = INT32_MAX) -> int | None:
    """A JSON number as a C int (fractions truncated), None if not one or out of range."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        value = int(value)
    if isinstance(value, int) and low <= value <= high:
        return value
    return None


def _asString(value: object) -> str | None:
    return _cleanString(value) if isinstance(value, str) else None


def _typedValue(obj: dict[str, Any]) -> Value | None:
    kind = _asInt(obj.get("type", TYPE_INT))
    if kind is None:
        return None
    if kind & TYPE_STR:
        return _asString(obj.get("strval"))
    return _asInt(obj.get("intval"))


def _parseJSON(body: bytes) -> object:
    try:
        return readJSON(body, _DECODER)
    except ValueError as e:
        raise MalformedMessage(str(e)) from None


def _decodeCell(item: object) -> Cell | None:
    if not isinstance(item, dict):
        return None
    htname = _asString(item.get("htname"))
    cname = _asString(item.get("cname"))
    value = _typedValue(item)
    if htname is None or cname is None or value is None:
        return None
    expire = _asInt(item.get("expire", 0), -(2**63), 2**63 - 1)
    return Cell(htname, cname, value, expire or 0)


def decodeMessage(body: bytes) -> Action | SyncCells:
    """
    Decode an htable body the way a 5.6.3 receiver reads it: a sync chunk
    when the object's first key is C{cells} (unknown keys in cells are
    ignored, unusable cells counted in C{invalid}), else an action whose
    keys must all be in L{ACTION_KEYS}. Duplicate keys are allowed (the
    last wins); strings may hold raw non-UTF-8 bytes (kept with
    C{surrogateescape}); bytes after the JSON value are ignored.

    @raise MalformedMessage: the cases 5.6.3 answers with 400, plus a body
        that is not a non-empty object (which crashes 5.6.3).
    """
    obj = _parseJSON(body)
    if not isinstance(obj, dict):
        raise MalformedMessage(f"not a JSON object but {type(obj).__name__}")
    if not obj:
        raise MalformedMessage("empty JSON object")
    if next(iter(obj)) == "cells":
        items = obj["cells"]
        if not isinstance(items, list):
            raise MalformedMessage("'cells' is not an array")
        cells = []
        invalid = 0
        for item in items:
            cell = _decodeCell(item)
            if cell is None:
                invalid += 1
            else:
                cells.append(cell)
        return SyncCells(tuple(cells), invalid)
    unknown = obj.keys() - ACTION_KEYS
    if unknown:
        raise MalformedMessage(f"unknown key(s) {', '.join(sorted(map(repr, unknown)))}")
    return Action(
        action=_asInt(obj.get("action", ACTION_NONE)) or ACTION_NONE,
        htname=_asString(obj.get("htname")),
        cname=_asString(obj.get("cname")),
        value=_typedValue(obj) if "type" in obj else None,
        mode=_asInt(obj.get("mode", 0)) or 0,
    )


# ---------------------------------------------------------------------------
# Limits


def _positive(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be positive, not {value}")


def _nonNegative(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must be 0 or more, not {value}")


@attrs.frozen
class HTableLimits:
    """
    Every limit of the htable peer, with its behaviour at the edge.
    """

    maxKeys: int = attrs.field(default=1_000_000, validator=_positive)
    """
    Cells per table. At the limit a new key is refused (an existing key can
    still be changed): a local L{HashTable.set} raises L{TableFull}; a
    remote set is answered C{500 Server Internal Error} (what Kamailio
    answers when it cannot store a cell), and a synced cell is skipped and
    counted (C{htable.sync.cells_skipped}); expired cells are purged first.
    """

    maxValueBytes: int = attrs.field(default=60_000, validator=_positive)
    """
    Bytes of a string value (or of a key) in a local write. A longer one
    raises C{ValueError}: it could not be replicated in one datagram. Values
    received from the bus are not checked (they did fit).
    """

    maxBodyBytes: int = attrs.field(default=64_000, validator=_positive)
    """
    Bytes of the JSON body of one local write, after escaping (a control
    character takes 6). A bigger body raises C{ValueError} before anything
    changes: with the SIP headers it would not fit Kamailio's 65,535-byte
    receive buffer.
    """

    maxPatternLength: int = attrs.field(default=256, validator=_positive)
    """
    Characters of a regular expression for L{HashTable.removeMatching}
    (action 5). Longer: a local call raises C{ValueError}, a remote action
    is answered 500. See L{checkPattern} for the other checks.
    """

    syncWindow: int = attrs.field(default=4, validator=_positive)
    """
    Sync chunks in flight to one requester. The first C{syncWindow} are
    sent before the sync request is answered; each answered chunk lets the
    next one go, and the first chunk that fails ends the stream (the
    requester is gone: nothing more is sent to it). Kamailio sends all at
    once, which overflows a receiver's UDP buffer with a big table and
    costs retransmissions.
    """

    streamChunkSize: int = attrs.field(default=15_000, validator=_positive)
    """
    Bytes of one sync chunk sent over TCP or TLS. Kamailio 5.6.3 reads a
    TCP message into a 16 KiB buffer (core C{tcp_rd_buf_size}) and drops a
    larger one ("tcp_read(): buffer overrun, dropping"): a 60,000-byte chunk
    never arrives and the sync request times out. Over UDP, C{chunkSize}
    (60,000) applies, as in Kamailio.
    """

    maxSyncStreams: int = attrs.field(default=8, validator=_positive)
    """
    Sync answers streaming at once, to different requesters. A sync request
    beyond it, or from a requester that already has a stream running, is
    answered 200 without sending anything (counted as
    C{htable.sync.refused_busy}); the requester's own retransmissions are
    absorbed earlier, by the SIP server transaction.
    """

    resyncInterval: float = attrs.field(default=10.0, validator=_positive)
    """
    Seconds between two heal re-syncs asked of the same node (see
    L{HTablePeer}). A node that comes back again sooner (it flapped) is
    asked once more when the interval ends, if it is still active then
    (counted as C{htable.resync.postponed}); one request at most is pending
    per node. With a big table a re-sync costs a full copy in each
    direction, which is what the interval bounds.
    """

    resyncRetries: int = attrs.field(default=3, validator=_nonNegative)
    """
    Times a heal re-sync is asked again, C{resyncInterval} apart, when the
    node answered without sending a single chunk (it did not list us yet,
    or was busy streaming) or did not answer at all. After the last retry
    the node is left alone (C{htable.resync.given_up}) until it comes back
    again.
    """


class TableFull(Exception):
    """A local set of a new key in a table that holds L{HTableLimits.maxKeys} cells."""


class UnsafePattern(ValueError):
    """A regular expression refused by L{checkPattern}."""


_reParser: Any = None
try:
    _reParser = importlib.import_module("re._parser")
except ImportError:  # pragma: no cover - other Pythons: length cap only
    _reParser = None


_REPEAT_OPS: tuple[Any, ...] = (
    tuple(
        getattr(_reParser, name)
        for name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT")
        if hasattr(_reParser, name)
    )
    if _reParser is not None
    else ()
)


def _riskyRepeats(items: Any, insideRepeat: bool) -> str | None:
    """Why the parsed pattern can backtrack exponentially, or None."""
    p = _reParser
    for op, arg in items:
        if op in _REPEAT_OPS:
            _low, high, sub = arg
            repeats = high > 1
            if repeats and insideRepeat:
                return "a repetition inside a repetition"
            reason = _riskyRepeats(sub, insideRepeat or repeats)
            if reason:
                return reason
        elif op is p.GROUPREF or op is p.GROUPREF_EXISTS:
            return "a back-reference"
        elif op is p.SUBPATTERN:
            reason = _riskyRepeats(arg[-1], insideRepeat)
            if reason:
                return reason
        elif op is p.BRANCH:
            if insideRepeat:
                return "an alternation inside a repetition"
            for branch in arg[1]:
                reason = _riskyRepeats(branch, insideRepeat)
                if reason:
                    return reason
        elif op in (p.ASSERT, p.ASSERT_NOT, p.ATOMIC_GROUP):
            sub = arg[-1] if isinstance(arg, tuple) else arg
            reason = _riskyRepeats(sub, insideRepeat)
            if reason:
                return reason
    return None


def checkPattern(pattern: str, maxLength: int) -> re.Pattern[str]:
    """
    Compile a regular expression for action 5, refusing the ones that can
    make Python's backtracking C{re} run for ever (there is no timeout in
    C{re}, and none is used): longer than C{maxLength}; with a repetition
    or an alternation inside a repetition (C{(a+)+}, C{(a|aa)*}: exponential
    time); with a back-reference. What is left runs in polynomial time in
    the length of a key or value, which L{HTableLimits.maxValueBytes}
    bounds for local writes; a pattern like C{.*.*.*x} on very long values
    is still slow (the residual risk, documented). Python's syntax is used
    where Kamailio uses POSIX extended regular expressions; the common
    subset (C{^ $ . [] * + ? {m,n} | ()}) means the same in both.

    @raise UnsafePattern: refused (too long, risky, or does not compile).
    """
    if len(pattern) > maxLength:
        raise UnsafePattern(f"pattern of {len(pattern)} characters exceeds {maxLength}")
    try:
        compiled = re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise UnsafePattern(f"pattern {pattern!r} does not compile: {e}") from None
    if _reParser is not None:
        try:
            reason = _riskyRepeats(_reParser.parse(pattern), False)
        except Exception as e:
            raise UnsafePattern(f"pattern {pattern!r} cannot be checked: {e}") from None
        if reason:
            raise UnsafePattern(f"pattern {pattern!r} has {reason} (exponential matching time)")
    return compiled


# ---------------------------------------------------------------------------
# Tables


@attrs.frozen
class TableChange:
    """
    One change of a table, handed to its observers.

    @ivar value: the value after the change; None for deletions and expiries.
    @ivar kind: C{set}, C{expire} (lifetime changed), C{delete}, C{remove}
        (by regex or prefix), C{sync} (a cell from a sync chunk) or
        C{expired}.
    @ivar origin: C{local} (this node's API or clock), C{remote} (an
        action from another node) or C{sync}.
    """

    table: str
    key: str
    value: Value | None
    kind: ChangeKind
    origin: ChangeOrigin


def _valueOrder(value: Value) -> tuple[int, int, bytes]:
    if isinstance(value, int):
        return (0, value, b"")
    return (1, 0, valueBytes(value))


def syncWinner(local: Value, received: Value) -> Value:
    """
    The conflict rule of sync cells: of two different values for one key,
    the greater one stays, ints before strings, ints by number, strings by
    their bytes. The rule only sees values (Kamailio's sync cells carry no
    write time), so it does not know which write was the last; what it
    gives is agreement: two nodes that exchange their tables (a heal
    re-sync goes both ways) end up with the same value, whichever chunk
    arrives first. Equal values: the received cell is applied (its expiry
    is taken).
    """
    return received if _valueOrder(received) > _valueOrder(local) else local


def _checkInt(value: int, what: str) -> None:
    if not INT32_MIN <= value <= INT32_MAX:
        raise ValueError(f"{what} {value} is outside the 32-bit signed range of Kamailio's int")


def _wireSeconds(seconds: float) -> int:
    """Seconds as the int Kamailio carries; a fraction rounds up (0.2 s is 1, not never)."""
    return math.ceil(seconds)


@implementer(IHashTable)
class HashTable:
    """
    One replicated table. Cells live in a dict; expiry times sit in a heap
    that one DelayedCall (the sweep) follows, firing at the earliest
    expiry; reads also drop expired cells. Times are
    C{clock.seconds()}: wall-clock Unix time with the real reactor, which
    is what sync chunks carry.
    """

    log = Logger()

    def __init__(
        self,
        spec: TableSpec,
        bus: IDMQBus,
        clock: IReactorTime,
        counters: Counter[str] | None = None,
        limits: HTableLimits = HTableLimits(),
    ) -> None:
        self.spec = spec
        self.bus = bus
        self.clock = clock
        self.counters: Counter[str] = counters if counters is not None else Counter()
        self.limits = limits
        self._cells: dict[str, tuple[Value, float]] = {}
        self._expiries: list[tuple[float, str]] = []
        self._sweep: IDelayedCall | None = None
        self._observers: list[Callable[[TableChange], None]] = []
        self._wireName = jsonString(spec.name)

    # -- IHashTable

    @property
    def name(self) -> str:
        """The table's name."""
        return self.spec.name

    @property
    def defaultExpire(self) -> float:
        """The table's autoexpire (0 = never)."""
        return self.spec.autoexpire

    def get(self, key: str) -> Value | None:
        cell = self._cells.get(key)
        if cell is None:
            return None
        if cell[1] and cell[1] <= self.clock.seconds():
            self._expire(key)
            return None
        return cell[0]

    def set(self, key: str, value: Value, expire: float | None = None) -> None:
        """
        Set C{key} (action 2) and, with C{expire}, its lifetime (action 3);
        see L{IHashTable.set}. C{expire=0} makes the key live for ever.
        Action 3 is broadcast once every node has answered action 2
        (Kamailio 5.6.3 applies them in parallel workers, seen on the wire
        to run 3 before 2 and lose the expiry); a node that does not answer
        delays it by up to the bus's request timeout.

        @raise ValueError: an int outside 32 bits, a key or value over
            L{HTableLimits.maxValueBytes}, a body over
            L{HTableLimits.maxBodyBytes}, a NUL character, a negative or
            too big C{expire}.
        @raise TableFull: a new key in a full table.
        """
        self._checkKey(key)
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise TypeError(f"a cell value is a str or an int, not {type(value).__name__}")
        if isinstance(value, int):
            _checkInt(value, "value")
        else:
            self._checkText(value, "value")
        body = encodeSet(self.name, key, value)
        self._checkBody(body)
        expireBody = None
        if expire is not None:
            self._checkExpire(expire)
            expireBody = encodeSetExpire(self.name, key, _wireSeconds(expire))
        if key not in self._cells and not self._roomForNewKey():
            raise TableFull(
                f"table {self.name!r} holds {len(self._cells)} keys, "
                f"the limit (maxKeys); {key!r} not set"
            )
        self._store(key, value, self._defaultExpiry(), "set", "local")
        sent = self._replicate(body)
        if expire is not None and expireBody is not None:
            self._applyExpire(key, expire, "local")
            if sent is not None:
                # Kamailio's parallel DMQ workers may apply an action 3 that
                # arrives right behind its action 2 first, and then drop it
                # (no such key yet): send it once every node has answered.
                sent.addBoth(self._replicateLater, expireBody)

    def setExpire(self, key: str, seconds: float) -> bool:
        """
        Give C{key} C{seconds} more life (action 3); 0 = for ever. False
        (and nothing sent) when absent.

        @raise ValueError: negative or beyond 32 bits.
        """
        self._checkKey(key)
        self._checkExpire(seconds)
        if self.get(key) is None:
            return False
        self._applyExpire(key, seconds, "local")
        self._replicate(encodeSetExpire(self.name, key, _wireSeconds(seconds)))
        return True

    def delete(self, key: str) -> bool:
        self._checkKey(key)
        if self.get(key) is None:
            return False
        self._remove(key, "delete", "local")
        self._replicate(encodeDelete(self.name, key))
        return True

    def removeMatching(self, pattern: str, *, byValue: bool = False, prefix: bool = False) -> int:
        """
        See L{IHashTable.removeMatching}. The action is sent even when
        nothing matched here (other nodes may hold matching keys).

        @raise ValueError: a regex refused by L{checkPattern} (L{UnsafePattern}),
            or a pattern with NUL or over the size limits.
        """
        self._checkText(pattern, "pattern")
        body = encodeRemove(self.name, pattern, byValue=byValue, prefix=prefix)
        self._checkBody(body)
        removed = self._removeMatching(pattern, byValue, prefix, "local")
        self._replicate(body)
        return removed

    def items(self) -> list[tuple[str, Value, float]]:
        self._purge()
        return [(key, value, expiresAt) for key, (value, expiresAt) in self._cells.items()]

    def __len__(self) -> int:
        self._purge()
        return len(self._cells)

    def addObserver(self, observer: Callable[[TableChange], None]) -> Callable[[], None]:
        self._observers.append(observer)

        def remove() -> None:
            if observer in self._observers:
                self._observers.remove(observer)

        return remove

    # -- used by the peer

    def applyAction(self, action: Action) -> tuple[int, str]:
        """
        Apply an action received from another node (never re-replicated).
        Returns the SIP code and reason to answer: 200, or 500 when it
        cannot be applied (missing fields, table full, refused regex).
        """
        kind = action.action
        if kind in (ACTION_SET, ACTION_SET_EXPIRE, ACTION_DELETE) and action.cname is None:
            self.counters["htable.in.incomplete"] += 1
            return 500, "Server Internal Error"
        key = action.cname or ""
        if kind == ACTION_SET:
            if action.value is None:
                self.counters["htable.in.incomplete"] += 1
                return 500, "Server Internal Error"
            if key not in self._cells and not self._roomForNewKey():
                self.counters["htable.in.table_full"] += 1
                return 500, "Server Internal Error"
            self._store(key, action.value, self._defaultExpiry(), "set", "remote")
        elif kind == ACTION_SET_EXPIRE:
            if not isinstance(action.value, int):
                self.counters["htable.in.incomplete"] += 1
                return 500, "Server Internal Error"
            if self.get(key) is not None:
                self._applyExpire(key, max(0, action.value), "remote")
        elif kind == ACTION_DELETE:
            if self.get(key) is not None:
                self._remove(key, "delete", "remote")
        else:
            if not isinstance(action.value, str):
                self.counters["htable.in.incomplete"] += 1
                return 500, "Server Internal Error"
            try:
                self._removeMatching(
                    action.value, action.mode == 1, kind == ACTION_REMOVE_PREFIX, "remote"
                )
            except UnsafePattern as e:
                self.counters["htable.in.bad_pattern"] += 1
                self.log.warn("refused remote pattern: {reason}", reason=str(e))
                return 500, "Server Internal Error"
        self.counters["htable.in.applied"] += 1
        return 200, "OK"

    def applyCell(self, cell: Cell) -> bool:
        """
        Store a synced cell: C{cell.expire − now} seconds of life, the
        table's default when that is ≤ 0. False when the table is full.

        A cell for a key held here with a different value is settled by
        L{syncWinner}: when the local value wins, the cell is dropped
        (counted as C{htable.sync.conflicts_kept}) and True is returned.
        """
        local = self._cells.get(cell.cname)
        if local is None:
            if not self._roomForNewKey():
                return False
        elif local[0] != cell.value and syncWinner(local[0], cell.value) == local[0]:
            if not local[1] or local[1] > self.clock.seconds():
                self.counters["htable.sync.conflicts_kept"] += 1
                return True
        now = self.clock.seconds()
        expiresAt = float(cell.expire) if cell.expire > now else self._defaultExpiry()
        self._store(cell.cname, cell.value, expiresAt, "sync", "sync")
        return True

    def encodedCells(self) -> Iterator[bytes]:
        """
        Every live cell as sync-chunk JSON, expiry as absolute time rounded
        up. The cells are the ones live now (a snapshot); each is encoded
        when the iterator reaches it.
        """
        self._purge()
        snapshot = list(self._cells.items())
        name = self.name
        return (
            encodeCell(name, key, value, math.ceil(expiresAt) if expiresAt else 0)
            for key, (value, expiresAt) in snapshot
        )

    def stop(self) -> None:
        """Cancel the sweep (the cells stay)."""
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None

    # -- internals

    def _checkKey(self, key: str) -> None:
        if not isinstance(key, str):
            raise TypeError(f"a key is a str, not {type(key).__name__}")
        self._checkText(key, "key")

    def _checkText(self, text: str, what: str) -> None:
        if "\x00" in text:
            raise ValueError(f"{what} holds a NUL character, where Kamailio's strings end")
        size = len(valueBytes(text))
        if size > self.limits.maxValueBytes:
            raise ValueError(
                f"{what} of {size} bytes exceeds maxValueBytes ({self.limits.maxValueBytes}): "
                "it could not be replicated in one datagram"
            )

    def _checkBody(self, body: bytes) -> None:
        if len(body) > self.limits.maxBodyBytes:
            raise ValueError(
                f"the JSON body would be {len(body)} bytes, over maxBodyBytes "
                f"({self.limits.maxBodyBytes}): it could not be replicated in one datagram"
            )

    @staticmethod
    def _checkExpire(seconds: float) -> None:
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"expire must be 0 or a positive number of seconds, not {seconds}")
        _checkInt(_wireSeconds(seconds), "expire")

    def _roomForNewKey(self) -> bool:
        if len(self._cells) < self.limits.maxKeys:
            return True
        self._purge()
        return len(self._cells) < self.limits.maxKeys

    def _defaultExpiry(self) -> float:
        auto = self.spec.autoexpire
        return self.clock.seconds() + auto if auto > 0 else 0.0

    def _store(
        self, key: str, value: Value, expiresAt: float, kind: ChangeKind, origin: ChangeOrigin
    ) -> None:
        self._cells[key] = (value, expiresAt)
        if expiresAt:
            self._trackExpiry(key, expiresAt)
        self._notify(TableChange(self.name, key, value, kind, origin))

    def _applyExpire(self, key: str, seconds: float, origin: ChangeOrigin) -> None:
        value, _ = self._cells[key]
        expiresAt = self.clock.seconds() + seconds if seconds > 0 else 0.0
        self._cells[key] = (value, expiresAt)
        if expiresAt:
            self._trackExpiry(key, expiresAt)
        self._notify(TableChange(self.name, key, value, "expire", origin))

    def _remove(self, key: str, kind: ChangeKind, origin: ChangeOrigin) -> None:
        del self._cells[key]
        self._notify(TableChange(self.name, key, None, kind, origin))

    def _removeMatching(
        self, pattern: str, byValue: bool, prefix: bool, origin: ChangeOrigin
    ) -> int:
        self._purge()
        if prefix:

            def matches(text: str) -> bool:
                return text.startswith(pattern)

        else:
            compiled = checkPattern(pattern, self.limits.maxPatternLength)

            def matches(text: str) -> bool:
                return compiled.search(text) is not None

        if byValue:
            doomed = [k for k, (v, _) in self._cells.items() if isinstance(v, str) and matches(v)]
        else:
            doomed = [k for k in self._cells if matches(k)]
        for key in doomed:
            self._remove(key, "remove", origin)
        return len(doomed)

    def _expire(self, key: str) -> None:
        self.counters["htable.expired"] += 1
        self._remove(key, "expired", "local")

    def _trackExpiry(self, key: str, expiresAt: float) -> None:
        heapq.heappush(self._expiries, (expiresAt, key))
        if len(self._expiries) > 2 * len(self._cells) + 1024:
            self._expiries = [(t, k) for k, (_, t) in self._cells.items() if t]
            heapq.heapify(self._expiries)
        self._scheduleSweep()

    def _scheduleSweep(self) -> None:
        if not self._expiries:
            return
        delay = max(0.0, self._expiries[0][0] - self.clock.seconds())
        if self._sweep is not None and self._sweep.active():
            if self._sweep.getTime() > self._expiries[0][0]:
                self._sweep.reset(delay)
            return
        self._sweep = self.clock.callLater(delay, self._runSweep)

    def _runSweep(self) -> None:
        self._sweep = None
        self._purge()
        self._scheduleSweep()

    def _purge(self) -> None:
        """Remove every cell whose time has come, notifying observers."""
        now = self.clock.seconds()
        heap = self._expiries
        while heap and heap[0][0] <= now:
            expiresAt, key = heapq.heappop(heap)
            cell = self._cells.get(key)
            if cell is not None and cell[1] == expiresAt:
                self._expire(key)

    def _notify(self, change: TableChange) -> None:
        for observer in list(self._observers):
            try:
                observer(change)
            except Exception:
                self.log.failure(
                    "observer of table {table} failed on key {key}",
                    table=change.table,
                    key=change.key,
                )

    def _replicate(self, body: bytes) -> Deferred[None] | None:
        """
        Broadcast one action; the Deferred fires (with None, never failing)
        once every node has answered or failed. None when nothing was sent.
        """
        if not self.spec.replicate:
            return None
        self.counters["htable.replication.sent"] += 1
        try:
            d = self.bus.broadcast(CHANNEL, body, CONTENT_TYPE, maxForwards=1)
        except Exception:
            self.counters["htable.replication.failures"] += 1
            self.log.failure("htable replication of table {table} failed", table=self.name)
            return None
        return d.addCallbacks(self._replicated, self._replicationError)

    def _replicateLater(self, _: object, body: bytes) -> None:
        self._replicate(body)

    def _replicated(self, result: BroadcastResult) -> None:
        for delivery in result.delivered:
            if not delivery.ok:
                self.counters["htable.replication.failures"] += 1
                self.log.warn(
                    "htable replication of table {table} refused by {node}: {code} {reason}",
                    table=self.name,
                    node=str(delivery.node),
                    code=delivery.code,
                    reason=delivery.reason,
                )
        for node, failure in result.failed:
            self.counters["htable.replication.failures"] += 1
            self.log.warn(
                "htable replication of table {table} to {node} failed: {error}",
                table=self.name,
                node=str(node),
                error=failure.getErrorMessage(),
            )

    def _replicationError(self, failure: Failure) -> None:
        self.counters["htable.replication.failures"] += 1
        self.log.failure("htable replication of table {table} failed", failure, table=self.name)


# ---------------------------------------------------------------------------
# The peer


class _ChunkSender:
    """
    Sends the chunks of one sync answer, encoding each when it is due, at
    most C{window} in flight.
    """

    def __init__(self, peer: HTablePeer, node: Node, chunks: Iterator[bytes], window: int) -> None:
        self.stopped = False
        self.peer = peer
        self.node = node
        self.chunks = chunks
        self.window = window
        self.inFlight = 0
        self.sent = 0
        self.bytes = 0
        self.exhausted = False
        self.finished = False
        self._pumping = False

    def pump(self) -> None:
        if self._pumping:
            return
        self._pumping = True
        try:
            while self.inFlight < self.window and not self.exhausted and not self.stopped:
                chunk = next(self.chunks, None)
                if chunk is None:
                    self.exhausted = True
                    break
                self.inFlight += 1
                self.sent += 1
                self.bytes += len(chunk)
                self.peer.counters["htable.sync.chunks_sent"] += 1
                try:
                    d = self.peer.bus.send(CHANNEL, self.node, chunk, CONTENT_TYPE, maxForwards=1)
                except Exception:
                    self._failed(Failure())
                    continue
                d.addCallbacks(self._answered, self._failed)
        finally:
            self._pumping = False
        if (self.exhausted or self.stopped) and self.inFlight == 0 and not self.finished:
            self.finished = True
            self.peer._syncFinished(self.node)
            self.peer.log.debug(
                "htable sync to {node} done: {chunks} chunks, {size} bytes",
                node=str(self.node),
                chunks=self.sent,
                size=self.bytes,
            )

    def _answered(self, delivery: Delivery) -> None:
        if not delivery.ok:
            self.stopped = True
            self.peer.counters["htable.sync.chunk_failures"] += 1
            self.peer.log.warn(
                "sync chunk to {node} answered {code} {reason}",
                node=str(self.node),
                code=delivery.code,
                reason=delivery.reason,
            )
        self._done()

    def _failed(self, failure: Failure) -> None:
        self.stopped = True
        self.peer.counters["htable.sync.chunk_failures"] += 1
        self.peer.log.warn(
            "sync chunk to {node} failed, stream stopped: {error}",
            node=str(self.node),
            error=failure.getErrorMessage(),
        )
        self._done()

    def _done(self) -> None:
        self.inFlight -= 1
        self.pump()


_OK = PeerResponse(200, "OK")
_BAD_REQUEST = PeerResponse(400, "Bad Request")
_INTERNAL_ERROR = PeerResponse(500, "Server Internal Error")


@implementer(IDMQPeer, IHashTables)
class HTablePeer:
    """
    The C{htable} channel: holds the declared tables, applies actions and
    sync chunks from other nodes, answers sync requests, and asks for a
    full copy when the node joins a bus (C{syncOnJoin}).

    Answers, as Kamailio 5.6.3 gives them: C{400 Bad Request} for a missing
    body, unparsable JSON, an unknown key, or a body that is not a
    non-empty object (5.6.3 crashes on those; we answer); C{500 Server
    Internal Error} for an unknown (or non-replicated) table, an unknown or
    NONE action, or an action that cannot be applied; C{200 OK} without
    body otherwise, sync chunks included even when some cells are skipped.

    Sync answers go to the requester only, in chunks of at most
    C{chunkSize} bytes, each its own KDMQ; the first
    L{HTableLimits.syncWindow} chunks are sent before the request is
    answered 200 (Kamailio's order: chunks first, then the answer). The
    requester must be a node of our list (found by the request's From-URI)
    and the request must come from that node's host; otherwise nothing is
    sent (counted as C{htable.sync.unknown_requester}) and the request is
    still answered 200. Kamailio 5.6.3 would broadcast the table to every
    node, and following the From-URI blindly would let anyone reflect our
    whole table at any host (a ~60,000x amplification). A joining node
    is always known by then: its join is processed before its sync request.

    Heal re-sync: once joined, when a node becomes active that was not
    (added to our list as active, or gone from disabled, pending or timeout
    to active: a partition healed, a stopped node resumed, a crashed node
    restarted), this peer asks THAT node, and only it, for a full copy
    (C{{"action":1}}, an ordinary sync request; Kamailio answers it too).
    The other side does the same on its own membership change, so writes
    made on either side of a partition reach both. At most one request per
    node per L{HTableLimits.resyncInterval}; an answer without any chunk
    (the node did not list us yet) is retried L{HTableLimits.resyncRetries}
    times. A node that asks us for a copy is asked back (same interval),
    which covers a node that never saw us go (it was stopped). While this
    node is alone, or has not joined yet, nothing is asked: L{busJoined}
    asks everybody.

    Conflicts: a sync cell for a key held here with another value is
    settled by L{syncWinner} (the greater value stays), so both sides of a
    healed partition agree on every key, but a key written on both sides
    keeps the greater value, not necessarily the last one written. Deletes
    are not carried by a sync: a key deleted on one side during a partition
    and still held on the other comes back everywhere. Kamailio nodes
    apply sync cells in arrival order and never re-sync after a heal: on a
    mixed bus they may keep a different value for a conflicting key.
    """

    log = Logger()
    channel = CHANNEL
    description = "tables replicated like Kamailio's htable (dmqreplicate=1)"

    def __init__(
        self,
        bus: IDMQBus,
        clock: IReactorTime,
        specs: Iterable[TableSpec],
        syncOnJoin: bool = True,
        chunkSize: int = DEFAULT_CHUNK_SIZE,
        *,
        limits: HTableLimits = HTableLimits(),
    ) -> None:
        if chunkSize < _CELLS_OVERHEAD + 2:
            raise ValueError(f"chunkSize {chunkSize} is too small for any sync chunk")
        self.bus = bus
        self.clock = clock
        self.syncOnJoin = syncOnJoin
        self.chunkSize = chunkSize
        self.limits = limits
        self.counters: Counter[str] = Counter()
        self._tables: dict[str, HashTable] = {}
        self._syncing: set[NodeKey] = set()
        self._joined = False
        # heal re-sync state, per node: when last asked, the postponed
        # request, retries left, chunks received from it
        # node -> clock time before which it is not asked for a re-sync again
        self._resyncAt: Deadlines[NodeKey] = Deadlines()
        self._resyncLater: dict[NodeKey, IDelayedCall] = {}
        self._resyncRetriesLeft: dict[NodeKey, int] = {}
        self._chunksFrom: Counter[NodeKey] = Counter()
        for spec in specs:
            if spec.name in self._tables:
                raise ValueError(f"htable: table {spec.name!r} declared twice")
            self._tables[spec.name] = HashTable(spec, bus, clock, self.counters, limits)
        self._stopObserving = bus.addMembershipObserver(self._membershipChanged)

    # -- IHashTables

    def table(self, name: str) -> HashTable | None:
        return self._tables.get(name)

    def tables(self) -> list[IHashTable]:
        return list(self._tables.values())

    # -- IDMQPeer

    def busJoined(self) -> None:
        """Ask every active node for a full copy (when C{syncOnJoin})."""
        self._joined = True
        if not self._replicating():
            return
        now = self.clock.seconds()
        for node in self.bus.nodes():
            if not node.local and node.status is NodeStatus.ACTIVE:
                self._resyncAt.set(node.key, now + self.limits.resyncInterval, now)
        self.counters["htable.sync.requests_sent"] += 1
        d = self.bus.broadcast(CHANNEL, encodeSyncRequest(), CONTENT_TYPE, maxForwards=1)
        d.addErrback(lambda failure: self.log.failure("htable sync request failed", failure))

    def messageReceived(self, message: DMQMessage) -> PeerResponse:
        """Apply an action or a sync chunk, or answer a sync request; never raises."""
        try:
            return self._handle(message)
        except Exception:
            self.counters["htable.in.errors"] += 1
            self.log.failure("htable message from {origin} failed", origin=str(message.origin))
            return _INTERNAL_ERROR

    def stop(self) -> None:
        """Cancel every table's expiry sweep and pending re-sync (call when the node stops)."""
        for table in self._tables.values():
            table.stop()
        self._stopObserving()
        for call in self._resyncLater.values():
            if call.active():
                call.cancel()
        self._resyncLater.clear()

    # -- heal re-sync

    def _replicating(self) -> bool:
        return self.syncOnJoin and any(t.spec.replicate for t in self._tables.values())

    def _membershipChanged(self, event: MembershipEvent) -> None:
        node = event.node
        if node.local:
            return
        if event.change is MembershipChange.REMOVED:
            self._resyncRetriesLeft.pop(node.key, None)
            self._chunksFrom.pop(node.key, None)
            if not any(not n.local for n in self.bus.nodes()):
                # alone: the next exchange runs busJoined again
                self._joined = False
            return
        cameBack = node.status is NodeStatus.ACTIVE and (
            event.change is MembershipChange.ADDED
            or (event.change is MembershipChange.STATUS and event.previous is not NodeStatus.ACTIVE)
        )
        if cameBack and self._joined and self._replicating():
            self._resyncRetriesLeft[node.key] = self.limits.resyncRetries
            self._askResync(node.key)

    def _askResync(self, key: NodeKey) -> None:
        """Ask node C{key} for a full copy now, or when its interval ends."""
        pending = self._resyncLater.get(key)
        if pending is not None and pending.active():
            return
        now = self.clock.seconds()
        until = self._resyncAt.get(key, now)
        if until is not None:
            self.counters["htable.resync.postponed"] += 1
            self._resyncLater[key] = self.clock.callLater(until - now, self._resyncDue, key)
            return
        self._sendResync(key)

    def _resyncDue(self, key: NodeKey) -> None:
        self._resyncLater.pop(key, None)
        self._sendResync(key)

    def _activeNode(self, key: NodeKey) -> Node | None:
        for node in self.bus.nodes():
            if node.key == key:
                return node if node.status is NodeStatus.ACTIVE and not node.local else None
        return None

    def _sendResync(self, key: NodeKey) -> None:
        node = self._activeNode(key)
        if node is None or not self._joined:
            return
        now = self.clock.seconds()
        self._resyncAt.set(key, now + self.limits.resyncInterval, now)
        self.counters["htable.resync.requests_sent"] += 1
        chunksBefore = self._chunksFrom[key]
        try:
            d = self.bus.send(CHANNEL, node, encodeSyncRequest(), CONTENT_TYPE, maxForwards=1)
        except Exception:
            self.log.failure("htable re-sync request to {node} failed", node=str(node))
            self._resyncUnanswered(key)
            return
        d.addCallbacks(
            self._resyncAnswered,
            lambda _: self._resyncUnanswered(key),
            callbackArgs=(key, chunksBefore),
        )

    def _resyncAnswered(self, delivery: Delivery, key: NodeKey, chunksBefore: int) -> None:
        if delivery.ok and self._chunksFrom[key] > chunksBefore:
            self._resyncRetriesLeft.pop(key, None)
            return
        self._resyncUnanswered(key)

    def _resyncUnanswered(self, key: NodeKey) -> None:
        """No chunk came back for a re-sync request: ask again, a bounded number of times."""
        left = self._resyncRetriesLeft.get(key, 0)
        if left <= 0:
            self._resyncRetriesLeft.pop(key, None)
            self.counters["htable.resync.given_up"] += 1
            return
        self._resyncRetriesLeft[key] = left - 1
        self.counters["htable.resync.retries"] += 1
        self._askResync(key)

    # -- internals

    def _handle(self, message: DMQMessage) -> PeerResponse:
        try:
            decoded = decodeMessage(message.body)
        except MalformedMessage as e:
            self.counters["htable.in.bad_request"] += 1
            self.log.warn(
                "htable: 400 to {origin}: {reason}", origin=str(message.origin), reason=str(e)
            )
            return _BAD_REQUEST
        if isinstance(decoded, SyncCells):
            if message.sender is not None:
                self._chunksFrom[message.sender.key] += 1
            return self._applyCells(decoded)
        if decoded.action == ACTION_SYNC:
            return self._answerSync(message)
        if not ACTION_SET <= decoded.action <= ACTION_REMOVE_PREFIX:
            self.counters["htable.in.unknown_action"] += 1
            return _INTERNAL_ERROR
        table = self._tables.get(decoded.htname) if decoded.htname is not None else None
        if table is None or not table.spec.replicate:
            self.counters["htable.in.unknown_table"] += 1
            return _INTERNAL_ERROR
        code, _ = table.applyAction(decoded)
        return _OK if code == 200 else _INTERNAL_ERROR

    def _applyCells(self, chunk: SyncCells) -> PeerResponse:
        self.counters["htable.sync.chunks_received"] += 1
        skipped = chunk.invalid
        applied = 0
        for cell in chunk.cells:
            table = self._tables.get(cell.htname)
            if table is None or not table.spec.replicate or not table.applyCell(cell):
                skipped += 1
            else:
                applied += 1
        self.counters["htable.sync.cells_applied"] += applied
        self.counters["htable.sync.cells_skipped"] += skipped
        return _OK

    def _requester(self, message: DMQMessage) -> Node | None:
        """The known node that sent C{message} from its own host, or None."""
        node = message.sender
        if node is None or node.address.host != message.origin.address.host:
            return None
        return node

    def _answerSync(self, message: DMQMessage) -> PeerResponse:
        self.counters["htable.sync.requests_received"] += 1
        node = self._requester(message)
        if node is None:
            self.counters["htable.sync.unknown_requester"] += 1
            self.log.debug(
                "htable sync request from {origin}: not a known node at its own address,"
                " nothing sent",
                origin=str(message.origin),
            )
            return _OK
        if node.key in self._syncing or len(self._syncing) >= self.limits.maxSyncStreams:
            self.counters["htable.sync.refused_busy"] += 1
            return _OK
        self._syncing.add(node.key)
        chunks = iterChunks(self._allCells(), self.chunkSizeFor(node))
        _ChunkSender(self, node, chunks, self.limits.syncWindow).pump()
        self._askBack(node.key)
        return _OK

    def _askBack(self, key: NodeKey) -> None:
        """
        A node asking us for a copy has seen us come back, or is joining:
        it may hold writes we missed (we may not have noticed it was gone,
        like a node that was stopped). Ask it back, unless it was asked
        within the interval (then nothing: no ping-pong).
        """
        if not self._joined or not self._replicating() or key in self._resyncLater:
            return
        if self._resyncAt.get(key, self.clock.seconds()) is not None:
            return
        self.counters["htable.resync.asked_back"] += 1
        self._sendResync(key)

    def chunkSizeFor(self, node: Node) -> int:
        """
        The sync chunk size toward C{node}: C{chunkSize}, or at most
        L{HTableLimits.streamChunkSize} when the node is reached over TCP or
        TLS.
        """
        if node.transport == "udp":
            return self.chunkSize
        return min(self.chunkSize, self.limits.streamChunkSize)

    def _syncFinished(self, node: Node) -> None:
        self._syncing.discard(node.key)

    def _allCells(self) -> Iterator[bytes]:
        """The cells of every replicated table, as they are now."""
        return itertools.chain.from_iterable(
            [t.encodedCells() for t in self._tables.values() if t.spec.replicate]
        )


@implementer(IPlugin, IDMQPeerFactory)
class HTablePeerFactory:
    """
    C{--peer htable=TABLES}: an L{HTablePeer} holding C{TABLES}, comma-separated
    L{TableSpec}s, e.g. C{kv,cache=autoexpire=60;dmqreplicate=1}.
    """

    name = "htable"
    description = "replicated hash tables, Kamailio htable compatible (=kv,cache=autoexpire=60)"

    def makePeer(self, bus: IDMQBus, options: str) -> IDMQPeer:
        return HTablePeer(bus, bus.clock, parseTableSpecs(options))


__all__ = [
    "ACTION_KEYS",
    "CHANNEL",
    "CONTENT_TYPE",
    "Action",
    "Cell",
    "HTableLimits",
    "HTablePeer",
    "HTablePeerFactory",
    "HashTable",
    "MalformedMessage",
    "SyncCells",
    "TableChange",
    "TableFull",
    "TableSpec",
    "UnsafePattern",
    "checkPattern",
    "chunkCells",
    "iterChunks",
    "decodeMessage",
    "encodeCell",
    "encodeCells",
    "encodeDelete",
    "encodeRemove",
    "encodeSet",
    "encodeSetExpire",
    "encodeSyncRequest",
    "jsonString",
    "parseTableSpec",
    "parseTableSpecs",
    "valueBytes",
]
