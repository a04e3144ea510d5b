"""
The node list: the one owner of membership state, with Kamailio 5.6.3's
merge rules and a node-list body codec that is safe for 5.6.3 receivers.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Iterable

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from dmq_bus.bus.values import (
    MembershipChange,
    MembershipEvent,
    Node,
    NodeKey,
    NodeStatus,
    isIPLiteral,
    nodeKey,
)
from dmq_bus.deadlines import Deadlines
from dmq_bus.sip.errors import SIPParseError
from dmq_bus.sip.uri import SIPURI

DEFAULT_MAX_NODES = 1024
"""
How many nodes one list holds. Past it, lines naming new nodes are ignored
(counted as C{nodes.rejected_limit}); known nodes are still updated.
"""


NODE_TRANSPORTS = frozenset({"udp", "tcp", "tls"})
"""Transports a node line may name; a line with another is skipped (counted)."""

MAX_LINE_LENGTH = 512
"""A received node-list line longer than this is skipped (counted)."""


@attrs.frozen
class NodeLine:
    """One parsed node-list line: a node URI and its status word, if any."""

    uri: SIPURI
    status: NodeStatus | None

    @property
    def key(self) -> NodeKey:
        """The identity of the node the line names."""
        return nodeKey(self.uri)


MEMO_BODY_BYTES = 8192
"""
Bodies up to this size are parsed once and remembered (the last 512): on
a steady bus every ping carries the same list. Larger ones are parsed each time.
"""


def parseNodeLines(body: bytes, counters: Counter[str] | None = None) -> list[NodeLine]:
    """
    Parse a node-list body leniently: LF or CRLF line ends, surrounding
    blanks and empty lines ignored; a line that is not a SIP URI or has an
    unknown status word is skipped (counted as C{nodelist.bad_lines}), the
    rest of the body still counts.
    """
    lines, bad = _parseMemo(body) if len(body) <= MEMO_BODY_BYTES else _parse(body)
    if bad and counters is not None:
        counters["nodelist.bad_lines"] += bad
    return list(lines)


@functools.lru_cache(maxsize=512)
def _parseMemo(body: bytes) -> tuple[tuple[NodeLine, ...], int]:
    return _parse(body)


def _parse(body: bytes) -> tuple[tuple[NodeLine, ...], int]:
    """The good lines of C{body} and how many bad ones it has."""
    bad = 0
    out: list[NodeLine] = []
    for raw in body.split(b"\n"):
        raw = raw.strip(b" \t\r\x00")
        if not raw:
            continue
        if len(raw) > MAX_LINE_LENGTH:
            bad += 1
            continue
        try:
            uri = SIPURI.parse(raw.decode("utf-8", "surrogateescape"))
        except SIPParseError:
            bad += 1
            continue
        transport = uri.param("transport")
        if transport is not None and transport.lower() not in NODE_TRANSPORTS:
            bad += 1
            continue
        word = uri.param("status")
        status: NodeStatus | None = None
        if word is not None:
            status = NodeStatus.fromWord(word)
            if status is None:
                bad += 1
                continue
        out.append(NodeLine(uri=uri, status=status))
    return tuple(out), bad


class NodeList:
    """
    The nodes of the bus as this node knows them, newest first, the local
    node included. Every change goes through here and is published to the
    membership observers.
    """

    log = Logger()

    def __init__(
        self,
        local: Node,
        maxNodes: int = DEFAULT_MAX_NODES,
        counters: Counter[str] | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        if not isIPLiteral(local.uri.host):
            raise ValueError(f"the local node must be an IP literal, not {local.uri.host!r}")
        self._local = attrs.evolve(local, status=NodeStatus.ACTIVE, local=True)
        # insertion order is oldest first; iteration in reverse gives Kamailio's order
        self._nodes: dict[NodeKey, Node] = {self._local.key: self._local}
        self.maxNodes = maxNodes
        self.counters: Counter[str] = counters if counters is not None else Counter()
        self._observers: list[Callable[[MembershipEvent], None]] = []
        self._held: set[NodeKey] = set()
        self._clock = clock
        # removed node -> clock time until which gossip cannot re-add it
        self._tombstones: Deadlines[NodeKey] = Deadlines()
        # nodes that showed they run dmq-bus (see markDMQBus); never on the wire
        self._dmqBus: set[NodeKey] = set()
        self._body: bytes | None = None

    # -- reading

    @property
    def local(self) -> Node:
        """This node's own entry."""
        return self._local

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, key: object) -> bool:
        return key in self._nodes

    def get(self, key: NodeKey) -> Node | None:
        """The node with identity C{key}, or None."""
        return self._nodes.get(key)

    def find(self, uri: SIPURI) -> Node | None:
        """The node a URI names (user part and other parameters ignored)."""
        return self._nodes.get(nodeKey(uri))

    def all(self) -> list[Node]:
        """Every node, newest first (the local node, added first, comes last)."""
        return list(reversed(self._nodes.values()))

    def others(self) -> list[Node]:
        """Every non-local node, whatever its status, newest first."""
        return [n for n in reversed(self._nodes.values()) if not n.local]

    def active(self) -> list[Node]:
        """The active non-local nodes, newest first: where broadcasts go."""
        return [
            n
            for n in reversed(self._nodes.values())
            if not n.local and n.status is NodeStatus.ACTIVE
        ]

    def isDMQBus(self, key: NodeKey) -> bool:
        """Whether node C{key} is known to run dmq-bus (see L{markDMQBus})."""
        return key in self._dmqBus

    def count(self, status: NodeStatus) -> int:
        """How many non-local nodes have C{status}."""
        return sum(1 for n in self._nodes.values() if not n.local and n.status is status)

    # -- changing

    def addObserver(self, observer: Callable[[MembershipEvent], None]) -> Callable[[], None]:
        """Call C{observer} on every change; returns its remover."""
        self._observers.append(observer)

        def remove() -> None:
            if observer in self._observers:
                self._observers.remove(observer)

        return remove

    def _publish(self, event: MembershipEvent) -> None:
        self._body = None
        self.counters[f"membership.{event.change.value}"] += 1
        for observer in list(self._observers):
            try:
                observer(event)
            except Exception:
                self.log.failure("membership observer {observer!r} failed", observer=observer)

    def add(self, node: Node) -> Node | None:
        """
        Add C{node} (as newest) unless its identity is known or the list is
        full; returns the stored entry, or None when it was not added.
        """
        key = node.key
        if key in self._nodes:
            return None
        if len(self._nodes) >= self.maxNodes:
            self.counters["nodes.rejected_limit"] += 1
            self.log.warn(
                "node list full ({maxNodes} nodes): not adding {node}",
                maxNodes=self.maxNodes,
                node=str(node),
            )
            return None
        node = attrs.evolve(node, local=False)
        self._nodes[key] = node
        self._publish(MembershipEvent(MembershipChange.ADDED, node))
        return node

    def setStatus(self, key: NodeKey, status: NodeStatus) -> Node | None:
        """
        Set the status of non-local node C{key}; returns the updated entry
        (None if unknown or local). Publishes only real changes.
        """
        node = self._nodes.get(key)
        if node is None or node.local:
            return None
        if node.status is status:
            return node
        updated = attrs.evolve(node, status=status)
        self._nodes[key] = updated
        self._publish(MembershipEvent(MembershipChange.STATUS, updated, previous=node.status))
        return updated

    def touch(self, key: NodeKey, when: float) -> None:
        """Record that a notification from node C{key} arrived at C{when}."""
        node = self._nodes.get(key)
        if node is not None and not node.local:
            self._nodes[key] = attrs.evolve(node, lastNotification=when)

    def markDMQBus(self, key: NodeKey) -> bool:
        """
        Record that listed non-local node C{key} runs dmq-bus (a request of
        its said so in its C{User-Agent}), so that it can be health-probed
        (L{dmq_bus.bus.health}). The flag is local knowledge: node-list
        bodies stay as Kamailio writes them. It goes with the node when it
        is removed. Returns whether the flag is newly set.
        """
        node = self._nodes.get(key)
        if node is None or node.local or key in self._dmqBus:
            return False
        self._dmqBus.add(key)
        return True

    def hold(self, key: NodeKey) -> None:
        """
        Let gossip no longer change node C{key}'s status (as for a disabled
        node): used for a seed that failed to answer us, until it does.
        """
        self._held.add(key)

    def release(self, key: NodeKey) -> None:
        """Undo L{hold}."""
        self._held.discard(key)

    def remove(self, key: NodeKey, hold: float = 0.0) -> Node | None:
        """
        Remove non-local node C{key}; returns the removed entry or None.
        With C{hold} > 0 (seconds), received lists cannot re-add it for that
        long: only a message from the node itself can (see L{forgive}), or
        its answer to a knock of the notification peer. This
        ends Kamailio's ghost nodes (issue #1840), where a dead node is
        re-added from a slower node's list.
        """
        node = self._nodes.get(key)
        if node is None or node.local:
            return None
        if hold > 0 and self._clock is not None:
            now = self._clock.seconds()
            self._tombstones.set(key, now + hold, now)
        del self._nodes[key]
        self._held.discard(key)
        self._dmqBus.discard(key)
        self._publish(MembershipEvent(MembershipChange.REMOVED, node))
        return node

    @property
    def tombstones(self) -> int:
        """Removed nodes remembered so that gossip cannot re-add them (expired ones included)."""
        return len(self._tombstones)

    def forgive(self, key: NodeKey) -> None:
        """Node C{key} contacted us itself: lift any hold on re-adding it."""
        self._tombstones.pop(key)

    def isBuried(self, key: NodeKey) -> bool:
        """
        Whether node C{key} was removed with a hold that is not over, so
        that received lists cannot re-add it (nothing is counted).
        """
        clock = self._clock
        return clock is not None and self._tombstones.get(key, clock.seconds()) is not None

    def _buried(self, key: NodeKey) -> bool:
        if not self.isBuried(key):
            return False
        self.counters["nodelist.ghosts_ignored"] += 1
        return True

    def merge(self, lines: Iterable[NodeLine]) -> bool:
        """
        Merge a received node list with Kamailio 5.6.3's rules: unknown
        nodes are added with the line's status (pending when it has none);
        a known non-local node takes the line's status unless the line has
        no status or the node is disabled (gossip cannot revive a node this
        node disabled); the local entry never changes. Returns whether
        anything was added or changed.
        """
        changed = False
        for line in lines:
            key = line.key
            node = self._nodes.get(key)
            if node is None:
                if self._tombstones and self._buried(key):
                    continue
                added = self.add(
                    Node.fromURI(
                        line.uri, line.status if line.status is not None else NodeStatus.PENDING
                    )
                )
                changed = changed or added is not None
            elif (
                node.local
                or line.status is None
                or node.status is NodeStatus.DISABLED
                or key in self._held
            ):
                continue
            elif node.status is not line.status:
                self.setStatus(key, line.status)
                changed = True
        return changed

    # -- the wire form

    def body(self, announce: NodeStatus | None = None) -> bytes:
        """
        This node's node-list body as Kamailio 5.6.3 writes it and can read
        it: the active nodes and the local node, newest first, one
        C{sip:ip:port[;transport=x];status=word} line each, every line
        CRLF-terminated (the last one too). Nodes whose host is not an IP
        literal are left out (a 5.6.3 receiver would resolve them by DNS,
        and a failure locks it up), and so are nodes of the other address
        family than ours (IPv6 in an IPv4 bus): we cannot reach them from our
        socket, and a 5.6.3 node that cannot send to one stops its
        broadcasts at that node. C{announce} overrides the local node's
        status word (C{disabled} when leaving). Built once per change of
        the list.
        """
        if announce is None and self._body is not None:
            return self._body
        lines = []
        ipv6 = self._local.uri.host.startswith("[")
        for node in reversed(self._nodes.values()):
            if node.local:
                lines.append(node.line(announce))
            elif (
                node.status is NodeStatus.ACTIVE
                and isIPLiteral(node.uri.host)
                and node.uri.host.startswith("[") == ipv6
            ):
                lines.append(node.line())
        body = "".join(f"{line}\r\n" for line in lines).encode("ascii")
        if announce is None:
            self._body = body
        return body
