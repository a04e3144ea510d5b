"""
Every zope interface of dmq-bus, from the SIP layer up to peers.

Interface methods are declared without C{self}. "May block" means "may
return a Deferred"; no method here ever blocks the reactor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from twisted.python.failure import Failure

    from dmq_bus.bus.values import (
        BroadcastResult,
        Delivery,
        DMQMessage,
        MembershipEvent,
        Node,
        PeerResponse,
    )
    from dmq_bus.peers.observed import Observation
    from dmq_bus.sip.address import Address, Origin
    from dmq_bus.sip.errors import SIPParseError
    from dmq_bus.sip.message import Message, Request, Response


# ---------------------------------------------------------------------------
# SIP layer


class ISIPMessageReceiver(Interface):
    """
    What the transports hand parsed messages to (the twisted.names
    "controller"): the transaction layer.
    """

    def messageReceived(message: Message, origin: Origin) -> None:
        """
        A whole, parsed message arrived from C{origin}. Must not raise;
        returns at once.
        """

    def unparseableRequest(error: SIPParseError, origin: Origin) -> None:
        """
        A request arrived whose headers parsed but which cannot be accepted
        (C{error.headers} is set): answer it statelessly with
        C{error.status}. Must not raise.
        """


class ISIPTransport(Interface):
    """
    Sends bytes over UDP, TCP or TLS: the transport layer below the
    transactions. Never blocks; never raises for network errors.
    """

    def send(
        data: bytes,
        destination: Address,
        onError: Callable[[Failure], None] | None = None,
    ) -> None:
        """
        Send one serialized message to C{destination}, opening or reusing
        one connection per destination for stream transports. C{onError}
        is called (at most once, maybe later) if it could not be sent.
        """

    def reply(data: bytes, origin: Origin, via: str) -> None:
        """
        Send a serialized response to a request received from C{origin}
        whose top Via value is C{via}: on the same connection for stream
        transports while it is open, otherwise per RFC 3261 §18.2.2
        (C{received}, C{rport}, sent-by).
        """


class ISIPRequestHandler(Interface):
    """The transaction user above server transactions."""

    def requestReceived(request: Request, origin: Origin) -> Response | Deferred[Response]:
        """
        A new request (never a retransmission) arrived. Return the final
        response, or a Deferred that fires with it (may block). A raised
        exception or a failed Deferred is answered with 500.
        """


class ISIPClient(Interface):
    """Sends requests in client transactions."""

    def request(
        request: Request, destination: Address, timeout: float | None = None
    ) -> Deferred[Response]:
        """
        Send C{request} (a Via with a new branch is added on top) to
        C{destination}, retransmitting over UDP. Fires with the final
        response; fails with L{dmq_bus.sip.transaction.TransactionTimeout}
        after C{timeout} seconds (default 64·T1) without one,
        L{dmq_bus.sip.transaction.TransportFailure} if it could not be sent,
        or L{dmq_bus.sip.transaction.TooManyTransactions} at once when the
        open-transaction limit is reached. May block.
        """


# ---------------------------------------------------------------------------
# The bus and its peers


class IDMQPeer(Interface):
    """
    An application on the bus, bound to one channel (Kamailio's peer id,
    the Request-URI user of its KDMQ requests). A peer may also have a
    C{stop()} method (no arguments); the node calls it when it stops.
    """

    channel = Attribute("str: the channel (peer id), e.g. 'htable'.")
    description = Attribute("str: one line saying what the peer does.")

    def messageReceived(message: DMQMessage) -> PeerResponse | Deferred[PeerResponse]:
        """
        A KDMQ request for this channel arrived (retransmissions are
        absorbed below and never reach here). Return the response, or a
        Deferred firing with it (may block). An exception or failure is
        answered with C{500 Server Internal Error} and logged.
        """

    def busJoined() -> None:
        """
        The local node has joined a bus (first notification exchanged), or
        rejoined after being alone. The place to request a sync. Must not
        block or raise.
        """


class IDMQBus(Interface):
    """What peers and applications see of the bus."""

    localNode = Attribute("Node: this node's own entry (status active, local).")
    clock = Attribute("IReactorTime: the clock the bus (and its peers) run on.")

    def registerPeer(peer: IDMQPeer) -> None:
        """
        Route KDMQ requests for C{peer.channel} to C{peer}.
        @raise ValueError: the channel already has a peer.
        """

    def unregisterPeer(channel: str) -> None:
        """Stop routing C{channel}; its requests get 404 again."""

    def nodes() -> Sequence[Node]:
        """Every node of the list, newest first, the local node included."""

    def findNode(uri: str) -> Node | None:
        """The node whose identity (host, port, transport) matches C{uri}."""

    def send(
        channel: str,
        node: Node,
        body: bytes,
        contentType: str,
        maxForwards: int = 1,
        timeout: float | None = None,
    ) -> Deferred[Delivery]:
        """
        Send one KDMQ request to C{node}. Fires with the L{Delivery} (any
        final response, error codes included); fails with
        L{dmq_bus.bus.values.DeliveryFailed} when no response came (timeout,
        transport error, limit reached). May block.
        """

    def broadcast(
        channel: str,
        body: bytes,
        contentType: str,
        exclude: Node | None = None,
        maxForwards: int = 1,
        timeout: float | None = None,
    ) -> Deferred[BroadcastResult]:
        """
        Send one KDMQ request to every active non-local node except
        C{exclude}. Fires, once every node has answered or failed, with the
        per-node outcome; never fails. May block.
        """

    def addMembershipObserver(observer: Callable[[MembershipEvent], None]) -> Callable[[], None]:
        """
        Call C{observer} for every membership change (node added, became
        active, pending or disabled, removed). Returns a function that
        removes the observer. Observers must not block; their exceptions
        are logged and ignored.
        """


class IDMQPeerFactory(Interface):
    """
    A plugin (found with C{twisted.plugin.getPlugins}) that makes a peer for
    C{--peer NAME[=OPTIONS]}. Implementations also provide
    C{twisted.plugin.IPlugin} and are instantiated in a module under
    C{twisted/plugins/}.
    """

    name = Attribute("str: the name given to --peer.")
    description = Attribute("str: one line for --help.")

    def makePeer(bus: IDMQBus, options: str) -> IDMQPeer:
        """
        Make the peer for C{bus}; C{options} is what followed C{=} in
        C{--peer NAME=OPTIONS} (empty when nothing did).
        @raise ValueError: the options are not valid (a usage error).
        """


# ---------------------------------------------------------------------------
# Replicated hash tables (the htable peer)


class IHashTable(Interface):
    """
    One replicated hash table (Kamailio's htable with C{dmqreplicate=1}).
    Values are C{str} (Kamailio type 2; bytes that are not UTF-8 are kept
    with C{surrogateescape}) or C{int} (type 0, 32-bit signed like
    Kamailio's). Local writes are applied at once and replicated to every
    active node; writes received from other nodes are applied and never
    re-replicated. No method blocks.
    """

    name = Attribute("str: the table's name (Kamailio's htname).")
    defaultExpire = Attribute("float: the table's autoexpire in seconds; 0 = never.")

    def get(key: str) -> str | int | None:
        """The value of C{key}, or None when absent or expired."""

    def set(key: str, value: str | int, expire: float | None = None) -> None:
        """
        Set C{key} (action 2), then, when C{expire} is given, its lifetime
        in seconds (action 3, as Kamailio's setx* does). Without C{expire}
        the table's C{defaultExpire} applies.
        @raise ValueError: an int outside the 32-bit signed range.
        """

    def setExpire(key: str, seconds: float) -> bool:
        """Give C{key} C{seconds} more life (action 3); False if absent."""

    def delete(key: str) -> bool:
        """Remove C{key} (action 4); False if it was absent (nothing sent)."""

    def removeMatching(pattern: str, *, byValue: bool = False, prefix: bool = False) -> int:
        """
        Remove every key (or, C{byValue}, every string value) matching the
        regular expression C{pattern} (action 5) or starting with it
        (C{prefix}, action 6). Returns how many were removed here.
        """

    def items() -> list[tuple[str, str | int, float]]:
        """Every live cell as C{(key, value, expiresAt)}; C{expiresAt} 0 = never."""

    def __len__() -> int:
        """How many live cells the table holds."""

    def addObserver(observer: Callable[[Any], None]) -> Callable[[], None]:
        """
        Call C{observer} with a L{dmq_bus.peers.htable.TableChange} after
        every change (local, replicated or synced, and expiries). Returns
        the function that removes it. Observers must not block.
        """


class IHashTables(Interface):
    """The tables of one node (the htable peer)."""

    def table(name: str) -> IHashTable | None:
        """The table called C{name}, or None."""

    def tables() -> list[IHashTable]:
        """Every declared table, in declaration order."""


# ---------------------------------------------------------------------------
# Other Kamailio channels, observed read-only


class IObservedChannel(Interface):
    """
    A read-only view of one DMQ channel another application (Kamailio's
    dialog, dmq_usrloc or presence module) replicates: what arrived,
    decoded. No method blocks. Implemented by the C{dialog}, C{usrloc} and
    C{presence} peers of L{dmq_bus.peers.observed}.
    """

    channel = Attribute("str: the observed channel, e.g. 'usrloc'.")

    def addObserver(observer: Callable[[Observation], None]) -> Callable[[], None]:
        """
        Call C{observer} with every L{Observation} (each item of a batch
        on its own), in arrival order. Returns the function that removes
        it (safe to call twice). Observers must not block; their exceptions
        are logged, counted and ignored.
        """

    def counts() -> Mapping[str, int]:
        """How many items of each kind arrived (C{update}, C{sync}, ...)."""

    def recent() -> Sequence[Observation]:
        """The last items received, oldest first (at most the record limit)."""

    def summary() -> dict[str, Any]:
        """
        A JSON-ready summary for C{dmq.stats}: C{channel}, C{messages},
        C{counts} (per kind), C{answers} (per SIP code), C{limit} and
        C{recent} (the last items as dicts, oldest first).
        """
