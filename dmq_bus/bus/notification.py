"""
The notification peer: DMQ's membership protocol (join, rebroadcast,
pings, failure handling and a graceful leave) as Kamailio 5.6.3 speaks it.
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from dmq_bus.bus.dispatch import DMQBus
from dmq_bus.bus.health import (
    HealthConfig,
    HealthMonitor,
    isDMQBusAgent,
    isDMQBusName,
    isHealthMessage,
)
from dmq_bus.bus.nodelist import NodeLine, parseNodeLines
from dmq_bus.bus.values import (
    Delivery,
    DeliveryFailed,
    DMQMessage,
    MembershipChange,
    MembershipEvent,
    Node,
    NodeKey,
    NodeStatus,
    PeerResponse,
    nodeKey,
)
from dmq_bus.deadlines import Deadlines
from dmq_bus.interfaces import IDMQPeer
from dmq_bus.sip.errors import SIPParseError
from dmq_bus.sip.uri import SIPURI

TEXT_PLAIN = "text/plain"
JOIN_MAX_FORWARDS = 2
"""Max-Forwards of a join: the seed rebroadcasts once, with budget 1."""
PING_MAX_FORWARDS = 1


@implementer(IDMQPeer)
class NotificationPeer:
    """
    Keeps the node list of one bus node in step with the others.

    State machine of a non-local node R, as in Kamailio 5.6.3:
    a line for R in a received list sets its status unless R is disabled;
    a 200 to any notification sent to R makes R active (even from
    disabled); a failure (no answer within C{pingTimeout}, or a 408) makes R
    pending if R is a configured seed (and, unlike 5.6.3, lets only R's own
    200 make it active again, so that gossip cannot flap it), removes R if R was already disabled
    when that request was sent, and disables R otherwise. Other answers
    change nothing. Unlike 5.6.3, a failure is ignored when R became
    active after that request was sent (R's own answer or request
    revived it meanwhile; gossip cannot revive a disabled or held node):
    it is news about R from before then.

    A node removed for not answering is held back from gossip for
    C{removedHold} (no ghosts); when a received list names it as active,
    it is asked directly instead (a knock, L{_knockBuried}), so that the
    two sides of a healed partition list each other again at once.
    """

    log = Logger()
    description = "membership: node lists, joins and pings"

    def __init__(self, bus: DMQBus, clock: IReactorTime) -> None:
        self.bus = bus
        self.clock = clock
        self.channel = bus.config.channel
        self.nodeList = bus.nodeList
        self.counters = bus.counters
        local = self.nodeList.local.key
        self._configuredSeeds = [
            Node.fromURI(uri, NodeStatus.PENDING)
            for uri in bus.config.notificationAddresses
            if Node.fromURI(uri).key != local
        ]
        self._seeds = list(self._configuredSeeds)
        self._seedKeys = {seed.key for seed in self._seeds}
        self._outstanding: set[NodeKey] = set()
        # node -> clock time it last became active (see _nodeFailed)
        self._activeSince: dict[NodeKey, float] = {}
        # removed nodes knocked at lately, until when (see _knockBuried)
        self._knocked: Deadlines[NodeKey] = Deadlines()
        self._loop: LoopingCall | None = None
        self.joined = False
        self.leaving = False
        self.health = HealthMonitor(bus, clock, self._healthFailed)
        self.nodeList.addObserver(self._greet)
        self.nodeList.addObserver(self._noteActive)

    def configureHealth(self, config: HealthConfig) -> None:
        """Use C{config} for failure detection between dmq-bus nodes (before L{start})."""
        self.health.config = config

    # -- life cycle

    def start(self) -> None:
        """Add the seeds, send the join, and ping every C{pingInterval}."""
        self._addSeeds()
        self.join()
        self._loop = LoopingCall(self.ping)
        self._loop.clock = self.clock
        self._loop.start(self.bus.config.pingInterval, now=False).addErrback(
            lambda f: self.log.failure("ping loop died", f)
        )
        self.health.start()

    def _addSeeds(self) -> None:
        for seed in self._seeds:
            self.nodeList.add(seed)

    def setSeeds(self, uris: Iterable[SIPURI]) -> None:
        """
        Replace the discovered seeds (see L{dmq_bus.bus.discovery}) with
        C{uris}; the configured seeds stay. Seeds are treated alike: pending
        when they fail, never removed while they are seeds. Once started, a
        new seed not yet in the list is added pending and sent a join at
        once. A seed no longer discovered stays in the list as any node
        does, until failed pings remove it.
        """
        local = self.nodeList.local.key
        seeds = {seed.key: seed for seed in self._configuredSeeds}
        for uri in uris:
            node = Node.fromURI(uri, NodeStatus.PENDING)
            if node.key != local:
                seeds.setdefault(node.key, node)
        discovered = [seed for seed in seeds.values() if seed.key not in self._seedKeys]
        self._seeds = list(seeds.values())
        self._seedKeys = set(seeds)
        if self._loop is None or self.leaving:
            return  # not started: start() adds them
        for seed in discovered:
            if self.nodeList.add(seed) is not None:
                self._notify(seed, JOIN_MAX_FORWARDS, tracked=True)

    def join(self) -> None:
        """Send our list to every other node (the seeds at start) with Max-Forwards 2."""
        for node in self.nodeList.others():
            self._notify(node, JOIN_MAX_FORWARDS, tracked=True)

    def ping(self) -> None:
        """
        Send our list to every other node, whatever its status, except the
        nodes the health monitor covers: of those, C{gossipNodes} picked at
        random; a node that still has a ping outstanding is skipped. Alone
        (no other node): re-add the seeds and join again, and run the peers'
        join hooks again on the next exchange.
        """
        if self.leaving:
            return
        others = self.nodeList.others()
        if not others:
            self.joined = False
            if not self._seeds:
                self.log.debug("alone on the bus and no notification address")
                return
            self._addSeeds()
            self.join()
            return
        covered = []
        for node in others:
            if self.health.covers(node):
                covered.append(node)
            elif node.key not in self._outstanding:
                self._notify(node, PING_MAX_FORWARDS, tracked=True)
        idle = [node for node in covered if node.key not in self._outstanding]
        count = min(self.health.config.gossipNodes, len(idle))
        for node in self.health.random.sample(idle, count):
            self._notify(node, PING_MAX_FORWARDS, tracked=True)

    def leave(self) -> Deferred[None]:
        """
        Announce to every other node that this node is leaving (our own line
        says C{status=disabled}, which Kamailio 5.6.3 applies at once), wait
        at most C{leaveTimeout} for their answers, and stop pinging. From now
        on notifications are answered 503, so that nobody marks us active again.
        """
        self.leaving = True
        self.health.stop()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        body = self.nodeList.body(announce=NodeStatus.DISABLED)
        sends = [
            self.bus.send(
                self.channel,
                node,
                body,
                TEXT_PLAIN,
                PING_MAX_FORWARDS,
                timeout=self.bus.config.leaveTimeout,
            )
            for node in self.nodeList.others()
        ]
        self.counters["notification.leave_sent"] += len(sends)
        return defer.DeferredList(sends, consumeErrors=True).addCallback(lambda _: None)

    def stop(self) -> None:
        """Stop pinging (without announcing anything)."""
        self.leaving = True
        self.health.stop()
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    # -- sending notifications and judging their answers

    def _notify(self, node: Node, maxForwards: int, *, tracked: bool) -> None:
        statusAtSend = node.status
        sentAt = self.clock.seconds()
        coveredAtSend = self.health.covers(node)
        key = node.key
        if tracked:
            self._outstanding.add(key)
        d = self._sendList(node, maxForwards)
        d.addCallbacks(
            self._answered,
            self._failed,
            callbackArgs=(coveredAtSend, sentAt),
            errbackArgs=(node, statusAtSend, coveredAtSend, sentAt),
        )
        if tracked:
            d.addBoth(lambda _: self._outstanding.discard(key))
        d.addErrback(lambda f: self.log.failure("handling a notification answer failed", f))

    def _sendList(self, node: Node, maxForwards: int) -> Deferred[Delivery]:
        """Send our node list to C{node}, waiting C{pingTimeout} for the answer."""
        return self.bus.send(
            self.channel,
            node,
            self.nodeList.body(),
            TEXT_PLAIN,
            maxForwards,
            timeout=self.bus.config.pingTimeout,
        )

    def _answered(self, delivery: Delivery, covered: bool = False, sentAt: float = 0.0) -> None:
        if self.leaving:
            return
        if delivery.code == 200:
            self.nodeList.release(delivery.node.key)
            self.nodeList.setStatus(delivery.node.key, NodeStatus.ACTIVE)
            if isDMQBusName(delivery.server):
                # the answer to our greeting (or any ping): without this, a
                # node that already knew us from our greeting would not
                # greet back, and we would never learn it runs dmq-bus
                self.nodeList.markDMQBus(delivery.node.key)
            lines = self._readList(delivery.body)
            self.nodeList.merge(lines)
            self._knockBuried(lines)
            self._runJoinHooks()
        elif delivery.code == 408:
            self._nodeFailed(delivery.node, delivery.node.status, covered, sentAt)
        else:
            self.counters[f"notification.answers_ignored.{delivery.code}"] += 1

    def _failed(
        self,
        failure: Failure,
        node: Node,
        statusAtSend: NodeStatus,
        covered: bool = False,
        sentAt: float = 0.0,
    ) -> None:
        if self.leaving:
            return
        error = failure.value
        if isinstance(error, DeliveryFailed) and error.code == 408:
            self._nodeFailed(node, statusAtSend, covered, sentAt)
        else:
            self.counters["notification.local_failures"] += 1

    def _nodeFailed(
        self, node: Node, statusAtSend: NodeStatus, covered: bool = False, sentAt: float = 0.0
    ) -> None:
        key = node.key
        became = self._activeSince.get(key)
        if became is not None and became > sentAt:
            # R became active after this request went out: the failure is
            # old news. Judged anyway, it put a seed revived by its own
            # request after a heal back to pending until our next ping, and
            # removed a disabled node that had come back meanwhile.
            self.counters["notification.stale_failures_ignored"] += 1
            return
        if covered:
            # a dmq-bus node that was active: the health monitor judges it.
            # Our own failed ping is evidence enough to start a suspicion
            # (confirmed by direct pings, announced to the others): a node
            # that missed another's announcement must not keep a dead node
            # listed for ever.
            self.health.counters["health.notification_failures"] += 1
            current = self.nodeList.get(key)
            if current is not None:
                self.health.suspect(current, announce=True)
            return
        if key in self._seedKeys:
            # unlike Kamailio, gossip may not make it active again: only its own answer
            self.nodeList.hold(key)
            self.nodeList.setStatus(key, NodeStatus.PENDING)
        elif statusAtSend is NodeStatus.DISABLED:
            if self.nodeList.remove(key, hold=self.bus.config.removedHold) is not None:
                self.counters["notification.nodes_removed"] += 1
                self.log.debug("node {node} removed: no answer while disabled", node=str(node))
        else:
            current = self.nodeList.get(key)
            if current is None or current.status is NodeStatus.DISABLED:
                return
            if self.nodeList.setStatus(key, NodeStatus.DISABLED) is not None:
                self.counters["notification.nodes_disabled"] += 1
                self.log.debug("node {node} disabled: no answer", node=str(node))

    def _readList(self, body: bytes) -> list[NodeLine]:
        """
        The lines of a node-list body we may merge: all of them, but with
        C{tlsOnly} only those of C{;transport=tls} nodes (the others are
        skipped, counted C{notification.lines_not_tls}), so that a TLS peer
        that lists a plain node never gets us to send to it in clear.
        """
        lines = parseNodeLines(body, self.counters)
        if not self.bus.config.access.tlsOnly:
            return lines
        kept = [line for line in lines if line.key[2] == "tls"]
        if len(kept) != len(lines):
            self.counters["notification.lines_not_tls"] += len(lines) - len(kept)
        return kept

    def _knockBuried(self, lines: Iterable[NodeLine]) -> None:
        """
        For every line that names as active a node we removed and still
        hold back from gossip (L{NodeList.isBuried}), ask that node itself
        with one notification (a knock), rather than believe the list or
        wait out the hold (C{removedHold}, 120 s). A node back from the
        other side of a healed partition answers: its own 200 lists it here
        again at once, and our request lists us there. A dead node (the
        ghost of Kamailio issue #1840) does not answer and stays out. At
        most one knock per node per C{pingInterval}.
        """
        if self.leaving or self._loop is None:
            return
        now = self.clock.seconds()
        for line in lines:
            key = line.key
            if line.status is not NodeStatus.ACTIVE or not self.nodeList.isBuried(key):
                continue
            if self._knocked.get(key, now) is not None:
                continue
            self._knocked.set(key, now + self.bus.config.pingInterval, now)
            self._knock(Node.fromURI(line.uri, NodeStatus.ACTIVE))

    def _knock(self, node: Node) -> None:
        """Send our list to removed node C{node}; list it again if it answers 200 itself."""
        self.counters["notification.knocks_sent"] += 1
        d = self._sendList(node, PING_MAX_FORWARDS)

        def answered(delivery: Delivery) -> None:
            if self.leaving or delivery.code != 200:
                return
            self.counters["notification.knocks_answered"] += 1
            self.nodeList.forgive(node.key)
            self.nodeList.add(node)
            self._answered(delivery)

        d.addCallbacks(answered, lambda _: None)
        d.addErrback(lambda f: self.log.failure("handling the answer to a knock failed", f))

    def _noteActive(self, event: MembershipEvent) -> None:
        """Remember when each node last became active (see L{_nodeFailed})."""
        key = event.node.key
        if event.change is MembershipChange.REMOVED:
            self._activeSince.pop(key, None)
        elif event.node.status is NodeStatus.ACTIVE and event.previous is not NodeStatus.ACTIVE:
            self._activeSince[key] = self.clock.seconds()

    def _greet(self, event: MembershipEvent) -> None:
        """
        With health probes on, ping a node learned from a list at once
        rather than at the next ping interval, so that both sides learn
        whether the other runs dmq-bus: the receiver from our request's
        C{User-Agent}, we from its answer's C{Server} (a Kamailio node just
        gets one more ping).
        """
        if (
            event.change is not MembershipChange.ADDED
            or self._loop is None
            or self.leaving
            or not self.health.enabled
        ):
            return
        key = event.node.key
        if key not in self._seedKeys:
            self.clock.callLater(0, self._greetNow, key)

    def _greetNow(self, key: NodeKey) -> None:
        node = self.nodeList.get(key)
        if node is None or self.leaving or key in self._outstanding:
            return
        if self.nodeList.isDMQBus(key):
            return
        self.health.counters["health.greetings_sent"] += 1
        self._notify(node, PING_MAX_FORWARDS, tracked=True)

    def _healthFailed(self, node: Node) -> None:
        """
        The health monitor found C{node} failed: a seed goes back to pending
        (held, as for a failed ping), any other node is disabled.
        """
        if self.leaving:
            return
        key = node.key
        if key in self._seedKeys:
            self.nodeList.hold(key)
            self.nodeList.setStatus(key, NodeStatus.PENDING)
        elif self.nodeList.setStatus(key, NodeStatus.DISABLED) is not None:
            self.counters["notification.nodes_disabled"] += 1
            self.log.debug("node {node} disabled: failed health probes", node=str(node))

    def _runJoinHooks(self) -> None:
        if self.joined:
            return
        self.joined = True
        self.counters["notification.joins"] += 1
        for peer in self.bus.peers():
            if peer is self:
                continue
            try:
                peer.busJoined()
            except Exception:
                self.log.failure("join hook of peer {channel} failed", channel=peer.channel)

    # -- IDMQPeer

    def messageReceived(self, message: DMQMessage) -> PeerResponse | Deferred[PeerResponse]:
        """
        A health message (C{Content-Type} C{application/x-dmq-health}) goes to
        the health monitor. Otherwise: note whether the sender runs dmq-bus;
        merge the sender's list; when it changed ours and the hop budget
        (Max-Forwards − 1) allows, rebroadcast our list to every active node
        first; then answer 200 with our list.
        """
        if self.leaving:
            return PeerResponse(503, "Service Unavailable")
        if isHealthMessage(message.contentType):
            return self.health.messageReceived(message)
        try:
            sender = message.request.headers.nameAddr("from")
        except SIPParseError:
            sender = None
        senderKey = nodeKey(sender.uri) if sender is not None else None
        if senderKey is not None:
            self.nodeList.forgive(senderKey)
        lines = self._readList(message.body)
        changed = self.nodeList.merge(lines)
        self._knockBuried(lines)
        if senderKey is not None:
            # after the merge, so that a joining node's first message counts too
            self.nodeList.touch(senderKey, self.clock.seconds())
            if isDMQBusAgent(message.request.headers):
                self.nodeList.markDMQBus(senderKey)
            changed = self._heardFrom(senderKey, lines, message) or changed
        budget = (message.maxForwards or 0) - 1
        if changed and budget > 0:
            self.counters["notification.rebroadcasts"] += 1
            for node in self.nodeList.active():
                self._notify(node, budget, tracked=False)
        self._runJoinHooks()
        return PeerResponse(200, "OK", self.nodeList.body(), TEXT_PLAIN)

    def _heardFrom(self, key: NodeKey, lines: list[NodeLine], message: DMQMessage) -> bool:
        """
        A notification from node C{key} itself, from its own host, proves it
        alive: a disabled or pending node is active again at once (not only
        when our next ping is answered, as in Kamailio 5.6.3), unless its
        own line says otherwise (a leaving node announces C{disabled}).
        Without this, a node restarted within a ping interval stays disabled
        on the others, who send it no writes meanwhile. Returns whether the
        status changed.
        """
        node = self.nodeList.get(key)
        if node is None or node.status is NodeStatus.ACTIVE:
            return False
        if node.address.host != message.origin.address.host:
            return False
        own = [line.status for line in lines if line.key == key]
        if own and own[-1] not in (None, NodeStatus.ACTIVE):
            return False
        self.nodeList.release(key)
        self.counters["notification.revived_by_request"] += 1
        return self.nodeList.setStatus(key, NodeStatus.ACTIVE) is not None

    def busJoined(self) -> None:
        """Nothing to do: this peer is what joins."""
