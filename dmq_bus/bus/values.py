"""
Values of the bus: node records, messages handed to peers, their answers,
delivery outcomes and membership events.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
from typing import TYPE_CHECKING

import attrs

from dmq_bus.sip.address import Address, Origin
from dmq_bus.sip.message import Request
from dmq_bus.sip.uri import SIPURI, stripBrackets

if TYPE_CHECKING:
    from twisted.python.failure import Failure


class NodeStatus(enum.IntEnum):
    """
    Node states, with Kamailio 5.6.3's numeric values and wire words.
    """

    ACTIVE = 2
    TIMEOUT = 4
    DISABLED = 8
    PENDING = 16

    @property
    def word(self) -> str:
        """The word written after C{;status=} on the wire."""
        return self.name.lower()

    @classmethod
    def fromWord(cls, word: str) -> NodeStatus | None:
        """
        The status for a wire word, or None when unknown. Kamailio ≥ 6.1's
        C{not_active} is read as L{TIMEOUT} (it is never written).
        """
        return _WORDS.get(word)


_WORDS = {s.word: s for s in NodeStatus} | {"not_active": NodeStatus.TIMEOUT}

NodeKey = tuple[str, int | None, str | None]
"""
A node's identity as Kamailio compares it: host string (exact, as written),
port (None when the URI has none) and transport parameter (lower case, None
when absent: C{;transport=udp} and no transport are different nodes).
"""


@functools.lru_cache(maxsize=4096)
def isIPLiteral(host: str) -> bool:
    """Whether C{host} is an IPv4 literal or a bracketed IPv6 literal."""
    try:
        ipaddress.ip_address(stripBrackets(host))
    except ValueError:
        return False
    return ":" not in host or host.startswith("[")


def nodeKey(uri: SIPURI) -> NodeKey:
    """The identity of the node a URI names (user part and other params ignored)."""
    transport = uri.param("transport")
    return (uri.host, uri.port, transport.lower() if transport else None)


@attrs.frozen
class Node:
    """
    One entry of the node list.

    @ivar uri: the node's URI as Kamailio rebuilds it: C{sip:host[:port]}
        plus C{;transport=} when the node has one; no user, no status.
    @ivar status: its current L{NodeStatus}.
    @ivar local: whether this is the local node itself.
    @ivar lastNotification: clock time of the last notification received
        from it (0 when none yet).
    """

    uri: SIPURI
    status: NodeStatus = NodeStatus.PENDING
    local: bool = False
    lastNotification: float = 0.0

    @classmethod
    def fromURI(cls, uri: SIPURI, status: NodeStatus = NodeStatus.PENDING) -> Node:
        """A node for C{uri}, keeping only host, port and transport."""
        transport = uri.param("transport")
        params = (("transport", transport),) if transport else ()
        return cls(
            uri=SIPURI(host=uri.host, port=uri.port, params=params, scheme="sip"), status=status
        )

    @property
    def key(self) -> NodeKey:
        """The identity of this node (see L{NodeKey})."""
        return nodeKey(self.uri)

    @property
    def transport(self) -> str:
        """C{"udp"}, C{"tcp"} or C{"tls"}: how requests reach this node."""
        return self.uri.transport

    @property
    def address(self) -> Address:
        """Where requests to this node are sent."""
        return Address(self.transport, stripBrackets(self.uri.host), self.uri.defaultedPort)

    def line(self, status: NodeStatus | None = None) -> str:
        """
        This node's node-list line without line end:
        C{sip:host:port[;transport=x];status=word}.
        """
        word = (status if status is not None else self.status).word
        return f"{self.uri};status={word}"

    def channelURI(self, channel: str) -> SIPURI:
        """C{sip:channel@host[:port][;transport=x]}: R-URI, To or From for a KDMQ."""
        transport = self.uri.param("transport")
        params = (
            (("transport", transport.lower()),) if transport and transport.lower() != "udp" else ()
        )
        return SIPURI(host=self.uri.host, port=self.uri.port, user=channel, params=params)

    def __str__(self) -> str:
        return str(self.uri)


@attrs.frozen
class DMQMessage:
    """
    A KDMQ request handed to a peer.

    @ivar sender: the node list entry matching the request's From-URI, or
        None when the sender is not (yet) a known node.
    @ivar maxForwards: the request's Max-Forwards, or None when absent.
    """

    channel: str
    body: bytes
    contentType: str | None
    sender: Node | None
    maxForwards: int | None
    origin: Origin
    request: Request = attrs.field(repr=False)


@attrs.frozen
class PeerResponse:
    """What a peer answers: a final SIP status, and optionally a body."""

    code: int = 200
    reason: str = "OK"
    body: bytes = b""
    contentType: str | None = None


@attrs.frozen
class Delivery:
    """
    The final response a node gave to one KDMQ request; C{server} is its
    C{Server} header (None without one: Kamailio 5.6.3 sends none).
    """

    node: Node
    code: int
    reason: str
    body: bytes = b""
    contentType: str | None = None
    server: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the node answered with a 2xx."""
        return 200 <= self.code < 300


class DeliveryFailed(Exception):
    """
    No response came from C{node}: C{code} is 408 for a timeout or a
    transport error (as Kamailio reports both), 503 when a local limit
    refused to send.
    """

    def __init__(self, node: Node, code: int, reason: str) -> None:
        super().__init__(node, code, reason)
        self.node = node
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        return f"KDMQ to {self.node} failed: {self.code} {self.reason}"


@attrs.frozen
class BroadcastResult:
    """The outcome of a broadcast, node by node."""

    delivered: tuple[Delivery, ...] = ()
    failed: tuple[tuple[Node, Failure], ...] = ()

    @property
    def allDelivered(self) -> bool:
        """Whether every node answered with a 2xx."""
        return not self.failed and all(d.ok for d in self.delivered)


class MembershipChange(enum.Enum):
    """Kinds of membership events."""

    ADDED = "added"
    STATUS = "status"
    REMOVED = "removed"


@attrs.frozen
class MembershipEvent:
    """
    A change of the node list: C{node} is the entry after the change (for
    L{MembershipChange.REMOVED}, the entry as it was); C{previous} is the
    status before a L{MembershipChange.STATUS} change.
    """

    change: MembershipChange
    node: Node
    previous: NodeStatus | None = None
