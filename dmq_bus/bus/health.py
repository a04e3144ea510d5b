"""
Failure detection between dmq-bus nodes: SWIM-style probes with indirect
probes and a suspicion phase, at a load per node that does not grow with
the bus.

Kamailio nodes never take part. A node counts as a dmq-bus node once a
notification request of its carried a C{User-Agent} starting with
C{dmq-bus}, a 200 of its to our notification carried such a C{Server}
(Kamailio 5.6.3 sends neither), or it sent us a health message
(L{NodeList.markDMQBus}: local knowledge, never on the wire). With probes
on, a node learned from a list is pinged at once (one notification ping,
as Kamailio sends every interval anyway), so both sides learn this within
milliseconds of a join, whichever greets first.
Until then, and always for Kamailio nodes (and for a dmq-bus node run
with an empty or changed C{--user-agent}), the notification peer pings
the node every C{pingInterval} and judges its answers exactly as Kamailio
5.6.3 does. Health messages are KDMQ requests on the notification channel
with C{Content-Type: application/x-dmq-health} (L{CONTENT_TYPE}); they
only go to nodes known to run dmq-bus, so Kamailio never sees one, and
the bus's channels and peers stay as they were.

Messages (C{Content-Type: application/x-dmq-health;kind=KIND}; the body
is a one-line node list, C{sip:IP:PORT;status=active} CRLF, naming the
node the message is about, or the sender: should a Kamailio node ever get
one, by a wrong flag, it reads a valid node list, never one that locks up
5.6.3's parser):

    kind=ping          -> 200: "I am alive" (body "passive" when the
                          receiver's probes are off: its prober then
                          probes the next node in the ring as well)
    kind=ping-req  X   -> the receiver probes X (a known dmq-bus node)
                          once, answers 200 if it answered, 480 if not
    kind=suspect   X   -> the receiver starts its own suspicion of X;
                          if X is the receiver, it refutes (sends alive)
    kind=alive         -> the sender refutes a suspicion of itself

Any health request from a node (its From names it and it came from its
host) is proof that it is alive: it ends a suspicion of it, and makes it
active again when it was disabled (or a seed put back to pending).

State machine of a covered node X (non-local, known dmq-bus, status
active), as seen by one node P:

    ALIVE --(P's probe of X: direct, then indirect, all fail)--> SUSPECT
    ALIVE --(a "suspect X" request arrives)-------------------> SUSPECT
    SUSPECT --(any answer or request from X)------------------> ALIVE
    SUSPECT --(suspicionTimeout passes, P's own confirmation
               probes of X all failed)------------------------> failed:
              X := disabled (a seed: pending, as Kamailio does)

A disabled X is no longer covered: the notification peer pings it as
Kamailio 5.6.3 does, and it is removed when that ping also fails (or
active again when it answers).

Each C{probeInterval}, P probes one node: its successor in the ring of the
covered nodes and itself, sorted by address. Every node is so probed by
one node each interval, and each node sends one probe (and answers about
one) per interval whatever the size of the bus. A node whose probes are
off (it answers pings "passive") is skipped over: its predecessor probes
it and the node after it too. A probe is a direct
C{ping} with C{probeTimeout}; when it fails, P sends C{ping-req X} to
C{indirectProbes} other covered nodes picked at random and a second direct
C{ping}, all with C{indirectTimeout}; one 200 is enough. When all fail, P
suspects X and tells every covered node (X included) with C{suspect X}.
Each node then confirms on its own: during C{suspicionTimeout} it sends
C{suspicionProbes} direct pings to X; none answered means X failed, at
that node. A node is thus disabled only by nodes that each failed to
reach it several times, which is what keeps false positives away at
packet loss.

Worst-case detection at every survivor, with no loss:
C{probeInterval + probeTimeout + indirectTimeout + suspicionTimeout}
(0.5 + 0.3 + 0.5 + 1.0 = 2.3 s with the defaults), plus one SIP
retransmission (T1, 0.5 s) when a C{suspect} request is lost.

Limits: the round trip between nodes must stay well under
C{probeTimeout} (0.3 s: a LAN or one region); several failures next to
each other in the ring (a partition, a rack) are found one probe round
apart, since suspected nodes are skipped over; probes run only where
they beat the Kamailio rules (L{HealthConfig.enabled}).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from dmq_bus.bus.nodelist import parseNodeLines
from dmq_bus.bus.values import (
    Delivery,
    DMQMessage,
    Node,
    NodeKey,
    NodeStatus,
    PeerResponse,
    nodeKey,
)
from dmq_bus.sip.message import Headers
from dmq_bus.sip.uri import SIPURI, stripBrackets

if TYPE_CHECKING:
    from dmq_bus.bus.dispatch import DMQBus

CONTENT_TYPE = "application/x-dmq-health"
"""
The media type that marks a notification-channel request as a health
message; its C{kind} parameter says which (C{application/x-dmq-health;kind=ping}).
"""

HEALTH_MODES: dict[str, bool | None] = {"auto": None, "on": True, "off": False}
"""The words of the C{health} option and the L{HealthConfig.enabled} each means."""

AGENT_PREFIX = "dmq-bus"
"""A C{User-Agent} starting with this marks its sender as a dmq-bus node."""

PASSIVE = b"passive"
"""The body of the answer to a ping from a node whose probes are off."""

_KINDS = frozenset({"ping", "ping-req", "suspect", "alive"})


def _positive(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, not {value!r}")


def _nonNegative(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, not {value!r}")


@attrs.frozen
class HealthConfig:
    """
    The knobs of failure detection between dmq-bus nodes.

    @ivar enabled: probe dmq-bus nodes (True), or treat every node as a
        Kamailio node (False: pings and judgements as Kamailio 5.6.3). None
        (the default) is automatic: on when the probes detect faster than
        the Kamailio rules would, that is when C{detectionBound <
        pingInterval + pingTimeout} (2.3 s < 10 s with the defaults); a bus
        configured to ping every node faster than that keeps doing so. A
        node answers health pings either way.
    @ivar probeInterval: seconds between two probe rounds; each round
        probes one node (the ring successor). Load per node: about
        C{4 / probeInterval} datagrams per second (a ping and its answer
        sent, one of each received), whatever the number of nodes.
    @ivar probeTimeout: seconds a direct ping waits for its answer.
    @ivar indirectProbes: how many other nodes (k) are asked to ping a node
        whose direct ping failed (fewer when fewer are known).
    @ivar indirectTimeout: seconds the indirect probes (and the second
        direct ping sent with them) wait; must exceed C{probeTimeout},
        which the helpers use for their own ping.
    @ivar suspicionTimeout: seconds a suspected node has to show it is alive
        before this node marks it failed. Worst-case detection without
        loss: C{probeInterval + probeTimeout + indirectTimeout +
        suspicionTimeout} (L{HealthConfig.detectionBound}).
    @ivar suspicionProbes: direct pings each node sends to a suspect during
        the suspicion, spread evenly over C{suspicionTimeout}; it is marked
        failed only if none is answered.
    @ivar announceTimeout: seconds a C{suspect} or C{alive} message waits
        for its answer; with T1 = 0.5 s the SIP layer retransmits it at
        0.5 s and 1.5 s within the default 1.6 s.
    @ivar gossipNodes: covered nodes that get the periodic notification
        ping (our node list) each ping interval, picked at random, instead
        of all of them: the node lists stay in step at
        C{gossipNodes / pingInterval} pings per node per second.
    """

    enabled: bool | None = None
    probeInterval: float = attrs.field(default=0.5, validator=_positive)
    probeTimeout: float = attrs.field(default=0.3, validator=_positive)
    indirectProbes: int = attrs.field(default=3, validator=_nonNegative)
    indirectTimeout: float = attrs.field(default=0.5, validator=_positive)
    suspicionTimeout: float = attrs.field(default=1.0, validator=_positive)
    suspicionProbes: int = attrs.field(default=3, validator=_nonNegative)
    announceTimeout: float = attrs.field(default=1.6, validator=_positive)
    gossipNodes: int = attrs.field(default=1, validator=_nonNegative)

    def __attrs_post_init__(self) -> None:
        if self.indirectTimeout <= self.probeTimeout:
            raise ValueError(
                f"indirectTimeout ({self.indirectTimeout}) must exceed "
                f"probeTimeout ({self.probeTimeout})"
            )

    def probesWith(self, pingInterval: float, pingTimeout: float) -> bool:
        """
        Whether probes run on a bus with these ping settings: C{enabled},
        or when automatic, C{detectionBound < pingInterval + pingTimeout}.
        """
        if self.enabled is not None:
            return self.enabled
        return self.detectionBound < pingInterval + pingTimeout

    @property
    def detectionBound(self) -> float:
        """
        Seconds from a crash until every survivor marked it failed, at
        worst, without loss: C{probeInterval + probeTimeout +
        indirectTimeout + suspicionTimeout}.
        """
        return self.probeInterval + self.probeTimeout + self.indirectTimeout + self.suspicionTimeout


def isHealthMessage(contentType: str | None) -> bool:
    """Whether a request with this C{Content-Type} is a health message."""
    return contentType is not None and contentType.partition(";")[0].strip() == CONTENT_TYPE


def _kindOf(contentType: str) -> str:
    for parameter in contentType.split(";")[1:]:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "kind":
            return value.strip()
    return ""


def isDMQBusAgent(headers: Headers) -> bool:
    """Whether a request's C{User-Agent} says dmq-bus sent it."""
    return isDMQBusName(headers.get("user-agent"))


def isDMQBusName(agent: str | None) -> bool:
    """Whether a C{User-Agent} or C{Server} value names dmq-bus."""
    return agent is not None and agent.startswith(AGENT_PREFIX)


def _cameFrom(message: DMQMessage, node: Node) -> bool:
    """
    Whether C{message} came from C{node}'s host, not only names it in its
    From: only then is it proof that C{node} is alive.
    """
    return message.origin.address.host == stripBrackets(node.uri.host)


def _ringOrder(key: NodeKey) -> tuple[str, int, str]:
    host, port, transport = key
    return (host, port or 0, transport or "")


@attrs.define
class _Suspicion:
    """The timers of one suspicion: its deadline and its confirmation pings."""

    deadline: IDelayedCall
    probes: list[IDelayedCall] = attrs.Factory(list)

    def cancel(self) -> None:
        for call in [self.deadline, *self.probes]:
            if call.active():
                call.cancel()


def _anyTrue(ds: Iterable[Deferred[bool]]) -> Deferred[bool]:
    """Fires True at the first of C{ds} that fires True, False when all fired False."""
    pending = list(ds)
    result: Deferred[bool] = Deferred()
    if not pending:
        result.callback(False)
        return result
    remaining = [len(pending)]

    def one(ok: bool) -> None:
        remaining[0] -= 1
        if result.called:
            return
        if ok:
            result.callback(True)
        elif remaining[0] == 0:
            result.callback(False)

    for d in pending:
        d.addCallback(one)
    return result


class HealthMonitor:
    """
    Probes the dmq-bus nodes of one node's list and marks the ones that
    fail (see the module docstring). Owned by the notification peer, which
    hands it the health messages it receives.
    """

    log = Logger()

    def __init__(
        self,
        bus: DMQBus,
        clock: IReactorTime,
        onFailed: Callable[[Node], None],
        config: HealthConfig | None = None,
    ) -> None:
        self.bus = bus
        self.clock = clock
        self.onFailed = onFailed
        self.config = config if config is not None else HealthConfig()
        self.nodeList = bus.nodeList
        self.counters: Counter[str] = Counter()
        """
        C{health.*} counters, apart from the bus's (which the Prometheus
        mapping must know by name) until C{dmq_bus/metrics.py} maps them.
        """
        self.channel = bus.config.channel
        # per-node seed: repeatable runs on a MemoryNetwork
        self.random = random.Random(str(bus.config.serverAddress))
        self._loop: LoopingCall | None = None
        self._probing: set[NodeKey] = set()
        self._suspicions: dict[NodeKey, _Suspicion] = {}
        # nodes that answered our pings that they do not probe
        self._passive: set[NodeKey] = set()
        self.stopped = False

    # -- life cycle

    @property
    def enabled(self) -> bool:
        """Whether probes run (L{HealthConfig.probesWith} this bus's ping settings)."""
        busConfig = self.bus.config
        return self.config.probesWith(busConfig.pingInterval, busConfig.pingTimeout)

    def start(self) -> None:
        """Probe every C{probeInterval} (when L{enabled})."""
        if not self.enabled or self._loop is not None:
            return
        self._loop = LoopingCall(self.probeRound)
        self._loop.clock = self.clock
        self._loop.start(self.config.probeInterval, now=False).addErrback(
            lambda f: self.log.failure("health probe loop died", f)
        )

    def stop(self) -> None:
        """Stop probing and drop every suspicion (idempotent)."""
        self.stopped = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        for suspicion in self._suspicions.values():
            suspicion.cancel()
        self._suspicions.clear()

    # -- who is covered

    def covers(self, node: Node) -> bool:
        """
        Whether C{node}'s failures are ours to judge: health is enabled,
        and C{node} is a non-local, active node known to run dmq-bus.
        """
        return (
            self.enabled
            and not node.local
            and node.status is NodeStatus.ACTIVE
            and self.nodeList.isDMQBus(node.key)
        )

    def covered(self) -> list[Node]:
        """The nodes L{covers} is true for."""
        return [n for n in self.nodeList.others() if self.covers(n)]

    def successor(self) -> Node | None:
        """
        The covered node after this one in the ring sorted by address,
        suspected nodes left out (so that several failures next to each
        other in the ring are probed one round apart), or None.
        """
        targets = self.targets()
        return targets[0] if targets else None

    def targets(self) -> list[Node]:
        """
        The nodes to probe this round: the L{successor}, and while that
        node is passive (it answered that it does not probe: health off
        there), the next one too, and so on: every covered node is probed
        by a node that probes.
        """
        covered = {n.key: n for n in self.covered() if n.key not in self._suspicions}
        if not covered:
            return []
        local = self.nodeList.local.key
        ring = sorted([*covered, local], key=_ringOrder)
        index = ring.index(local)
        out = []
        for step in range(1, len(ring)):
            node = covered[ring[(index + step) % len(ring)]]
            out.append(node)
            if node.key not in self._passive:
                break
        return out

    def suspected(self, key: NodeKey) -> bool:
        """Whether node C{key} is suspected here now."""
        return key in self._suspicions

    # -- probing

    def probeRound(self) -> None:
        """One round: probe the ring successor unless a probe of it is open."""
        if self.stopped:
            return
        for target in self.targets():
            if target.key not in self._probing:
                self.probe(target)

    def probe(self, target: Node) -> Deferred[bool]:
        """
        Probe C{target}: direct, then indirect through C{indirectProbes}
        random covered nodes plus a second direct ping; suspect it (and
        say so to every covered node) when nothing is answered. Fires
        whether it answered.
        """
        key = target.key
        self._probing.add(key)
        self.counters["health.probes"] += 1

        def direct(ok: bool) -> Deferred[bool] | bool:
            if ok or self.stopped:
                return ok
            self.counters["health.indirect_rounds"] += 1
            helpers = [n for n in self.covered() if n.key != key]
            count = min(self.config.indirectProbes, len(helpers))
            chosen = self.random.sample(helpers, count)
            timeout = self.config.indirectTimeout
            attempts = [self._ping(target, timeout)]
            attempts += [self._pingReq(helper, target, timeout) for helper in chosen]
            return _anyTrue(attempts)

        def judged(ok: bool) -> bool:
            self._probing.discard(key)
            if not ok and not self.stopped:
                current = self.nodeList.get(key)
                if current is not None and self.covers(current):
                    self.suspect(current, announce=True)
            return ok

        d = self._ping(target, self.config.probeTimeout)
        d.addCallback(direct)
        d.addCallback(judged)
        return d

    def _send(
        self, node: Node, kind: str, about: Node | None, timeout: float
    ) -> Deferred[Delivery]:
        """
        Send a health message of C{kind} to C{node}. The body is a node list
        that Kamailio 5.6.3 reads without harm (should a Kamailio node ever
        get one): the line of the node it is C{about}, or else our own.
        """
        line = (about or self.nodeList.local).line(NodeStatus.ACTIVE)
        return self.bus.send(
            self.channel,
            node,
            f"{line}\r\n".encode("ascii"),
            f"{CONTENT_TYPE};kind={kind}",
            1,
            timeout=timeout,
        )

    def _ping(self, node: Node, timeout: float) -> Deferred[bool]:
        """A direct ping: fires whether C{node} answered 200 in time."""
        self.counters["health.pings_sent"] += 1
        key = node.key

        def answered(delivery: Delivery) -> bool:
            if delivery.code == 200:
                self._heardFrom(key)
                if delivery.body.strip() == PASSIVE:
                    self._passive.add(key)
                else:
                    self._passive.discard(key)
                return True
            return False

        def failed(_: Failure) -> bool:
            return False

        return self._send(node, "ping", None, timeout).addCallbacks(answered, failed)

    def _pingReq(self, helper: Node, target: Node, timeout: float) -> Deferred[bool]:
        """Ask C{helper} to ping C{target}: fires whether it says C{target} answered."""
        self.counters["health.ping_reqs_sent"] += 1

        def answered(delivery: Delivery) -> bool:
            if delivery.code == 200:
                self._heardFrom(target.key)
                return True
            return False

        def failed(_: Failure) -> bool:
            return False

        return self._send(helper, "ping-req", target, timeout).addCallbacks(answered, failed)

    # -- suspicion

    def suspect(self, node: Node, *, announce: bool) -> None:
        """
        Start suspecting covered node C{node} (nothing if it is already
        suspected or not covered): confirm with C{suspicionProbes} direct
        pings over C{suspicionTimeout}, then mark it failed unless it showed
        it is alive. With C{announce}, tell every covered node, C{node}
        included (so that it refutes).
        """
        key = node.key
        if self.stopped or key in self._suspicions or not self.covers(node):
            return
        self.counters["health.suspicions"] += 1
        config = self.config
        suspicion = _Suspicion(self.clock.callLater(config.suspicionTimeout, self._expire, key))
        for i in range(config.suspicionProbes):
            at = i * config.suspicionTimeout / config.suspicionProbes
            timeout = min(config.probeTimeout, config.suspicionTimeout - at)
            suspicion.probes.append(self.clock.callLater(at, self._confirm, key, timeout))
        self._suspicions[key] = suspicion
        self.log.debug("node {node} suspected", node=str(node))
        if announce:
            for other in self.covered():
                self.counters["health.suspects_sent"] += 1
                self._send(other, "suspect", node, config.announceTimeout).addErrback(
                    lambda _: None
                )

    def _confirm(self, key: NodeKey, timeout: float) -> None:
        node = self.nodeList.get(key)
        if node is not None and key in self._suspicions:
            self.counters["health.confirmations_sent"] += 1
            self._ping(node, timeout)

    def _expire(self, key: NodeKey) -> None:
        suspicion = self._suspicions.pop(key, None)
        if suspicion is None:
            return
        suspicion.cancel()
        node = self.nodeList.get(key)
        if node is None or not self.covers(node) or self.stopped:
            return
        self.counters["health.nodes_failed"] += 1
        self.log.debug("node {node} failed: suspected and not answering", node=str(node))
        self.onFailed(node)

    def _heardFrom(self, key: NodeKey) -> None:
        """Node C{key} is alive: end its suspicion."""
        suspicion = self._suspicions.pop(key, None)
        if suspicion is not None:
            suspicion.cancel()
            self.counters["health.suspicions_refuted"] += 1

    # -- receiving

    def messageReceived(self, message: DMQMessage) -> PeerResponse | Deferred[PeerResponse]:
        """
        Answer one health message (see the module docstring); a request
        from a node proves it alive.
        """
        kind = _kindOf(message.contentType or "")
        if kind not in _KINDS:
            self.counters["health.in.bad"] += 1
            return PeerResponse(400, "Bad Health Message")
        self.counters[f"health.in.{kind}"] += 1
        sender = message.sender
        if sender is not None and not sender.local and _cameFrom(message, sender):
            self.nodeList.markDMQBus(sender.key)
            self._revive(sender)
            self._heardFrom(sender.key)
        if kind == "ping" and not self.enabled:
            return PeerResponse(200, "OK", PASSIVE + b"\r\n", CONTENT_TYPE)
        if kind == "ping" or kind == "alive":
            return PeerResponse(200, "OK")
        lines = parseNodeLines(message.body)
        uri = lines[0].uri if len(lines) == 1 else None
        if uri is None:
            self.counters["health.in.bad"] += 1
            return PeerResponse(400, "Bad Health Message")
        if kind == "suspect":
            return self._suspectReceived(uri, sender)
        return self._pingReqReceived(uri)

    def _revive(self, node: Node) -> None:
        """A disabled (or failed seed's pending) dmq-bus node contacted us: active again."""
        if not self.enabled or self.stopped:
            return
        current = self.nodeList.get(node.key)
        if current is None or current.status is NodeStatus.ACTIVE:
            return
        self.nodeList.release(node.key)
        if self.nodeList.setStatus(node.key, NodeStatus.ACTIVE) is not None:
            self.counters["health.nodes_revived"] += 1

    def _suspectReceived(self, uri: SIPURI, sender: Node | None) -> PeerResponse:
        key = nodeKey(uri)
        if key == self.nodeList.local.key:
            self.counters["health.refutations_sent"] += 1
            targets = {n.key: n for n in self.covered()}
            if sender is not None and not sender.local:
                targets.setdefault(sender.key, sender)
            for target in targets.values():
                self._send(target, "alive", None, self.config.announceTimeout).addErrback(
                    lambda _: None
                )
            return PeerResponse(200, "OK")
        node = self.nodeList.get(key)
        if node is not None and not self.stopped:
            self.suspect(node, announce=False)
        return PeerResponse(200, "OK")

    def _pingReqReceived(self, uri: SIPURI) -> PeerResponse | Deferred[PeerResponse]:
        if not self.enabled or self.stopped:
            return PeerResponse(503, "Health Probes Off")
        target = self.nodeList.find(uri)
        if target is None or target.local or not self.nodeList.isDMQBus(target.key):
            # only known dmq-bus nodes: never a reflector toward anything else
            self.counters["health.ping_reqs_refused"] += 1
            return PeerResponse(404, "Not A Known dmq-bus Node")
        d = self._ping(target, self.config.probeTimeout)
        return d.addCallback(
            lambda ok: PeerResponse(200, "OK") if ok else PeerResponse(480, "No Answer")
        )


__all__ = [
    "AGENT_PREFIX",
    "CONTENT_TYPE",
    "HEALTH_MODES",
    "HealthConfig",
    "HealthMonitor",
    "isDMQBusAgent",
    "isDMQBusName",
    "isHealthMessage",
]
