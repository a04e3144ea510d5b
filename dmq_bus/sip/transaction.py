"""
RFC 3261 §17 non-INVITE transactions: the layer between the transports and
the bus.

Client transactions send a request, retransmit it over UDP (Timer E), give
up after a timeout (Timer F) and absorb retransmitted responses for a while
(Timer K). Server transactions hand each new request to the application
exactly once, absorb retransmissions of it while the application works,
answer them with the stored response afterwards (Timer J), and answer
requests that cannot be accepted statelessly.

Everything is scheduled on an injected L{IReactorTime}. Timers whose delay
is the same for every transaction (J, K, the application's response
timeout) share one L{IDelayedCall} per kind instead of one per transaction.
"""

from __future__ import annotations

import itertools
import math
import secrets
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from dmq_bus.interfaces import (
    ISIPClient,
    ISIPMessageReceiver,
    ISIPRequestHandler,
    ISIPTransport,
)
from dmq_bus.sip.address import Address, Origin
from dmq_bus.sip.errors import SIPParseError
from dmq_bus.sip.message import (
    ENCODING,
    ERRORS,
    Headers,
    Message,
    Request,
    Response,
    makeResponse,
)
from dmq_bus.sip.uri import NameAddr, Via, splitCommaValues

MAGIC_COOKIE = "z9hG4bK"
"""How every RFC 3261 branch begins (§8.1.1.7)."""

SWEEP_GRANULARITY = 0.05
"""
Seconds: timers shared by many transactions (J, K, the response timeout)
fire at most this late after a deadline, so that a busy layer wakes up at
most 1/SWEEP_GRANULARITY times a second per timer kind.
"""


def _positive(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be positive, not {value!r}")


@attrs.frozen
class TimerPolicy:
    """
    RFC 3261 timer values (§17.1.2.2, Table 4), in seconds.

    @ivar t1: the round-trip estimate; the first UDP retransmission comes
        after C{t1}, then the interval doubles.
    @ivar t2: the cap of the UDP retransmission interval, and the interval
        once a provisional response arrived.
    @ivar t4: how long a message may stay in the network; how long a
        completed UDP client transaction absorbs retransmitted responses.
    """

    t1: float = attrs.field(default=0.5, validator=_positive)
    t2: float = attrs.field(default=4.0, validator=_positive)
    t4: float = attrs.field(default=5.0, validator=_positive)

    @property
    def timerF(self) -> float:
        """The default client timeout: 64·T1 (32 s with defaults)."""
        return 64 * self.t1

    @property
    def timerJ(self) -> float:
        """How long a completed UDP server transaction answers retransmissions: 64·T1."""
        return 64 * self.t1

    @property
    def timerK(self) -> float:
        """How long a completed UDP client transaction absorbs responses: T4."""
        return self.t4


@attrs.frozen
class TransactionLimits:
    """
    Bounds of the transaction layer; what happens at each edge.

    @ivar maxClientTransactions: client transactions waiting for a final
        response. At the limit L{TransactionLayer.request} fails at once
        with L{TooManyTransactions} and sends nothing.
    @ivar maxServerTransactions: server transactions waiting for the
        application's response. At the limit a new request is answered
        C{503 Service Unavailable} without reaching the application.
    @ivar serverResponseTimeout: seconds a server transaction waits for the
        application's response (default 64·T1 with the default T1). Then
        the request is answered C{500 Server Internal Error} and a later
        response from the application is dropped.
    @ivar maxCompletedTransactions: completed transactions remembered per
        side to absorb retransmissions (Timer J on the server, Timer K on
        the client; about 32 s and 5 s of traffic over UDP). Beyond it the
        oldest is forgotten early: a request retransmitted after that would
        reach the application again, a response would count as unmatched.
    """

    maxClientTransactions: int = attrs.field(default=100_000, validator=_positive)
    maxServerTransactions: int = attrs.field(default=200_000, validator=_positive)
    serverResponseTimeout: float = attrs.field(default=32.0, validator=_positive)
    maxCompletedTransactions: int = attrs.field(default=500_000, validator=_positive)


class TransactionError(Exception):
    """A client transaction ended without a final response."""


class TransactionTimeout(TransactionError):
    """No final response came before the timeout (the bus maps this to 408)."""


class TransportFailure(TransactionError):
    """
    The transport could not send the request.

    @ivar failure: the transport's own failure.
    """

    def __init__(self, failure: Failure) -> None:
        super().__init__(f"could not send: {failure.getErrorMessage()}")
        self.failure = failure


class TooManyTransactions(TransactionError):
    """
    The limit of client transactions waiting for a response was reached.

    @ivar limit: that limit.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(f"{limit} client transactions already waiting for a response")
        self.limit = limit


_K = TypeVar("_K", bound=Hashable)
_V = TypeVar("_V")


class _ExpiryQueue(Generic[_K, _V]):
    """
    Entries that expire a fixed delay after they were added, kept in
    insertion order (hence deadline order) and watched by one DelayedCall.
    """

    def __init__(
        self,
        clock: IReactorTime,
        delay: float,
        expired: Callable[[_K, _V], None] | None = None,
    ) -> None:
        self._clock = clock
        self._delay = delay
        self._expired = expired
        self._entries: OrderedDict[_K, tuple[float, _V]] = OrderedDict()
        self._call: IDelayedCall | None = None
        self._sweeping = False

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: _K) -> _V | None:
        """The value added under C{key}, or None."""
        entry = self._entries.get(key)
        return None if entry is None else entry[1]

    def add(self, key: _K, value: _V) -> None:
        """Expire C{key} after the delay (C{key} must not be present)."""
        self._entries[key] = (self._clock.seconds() + self._delay, value)
        if self._call is None and not self._sweeping:
            self._call = self._clock.callLater(self._delay, self._sweep)

    def pop(self, key: _K) -> _V | None:
        """Forget C{key} without expiring it; its value, or None."""
        entry = self._entries.pop(key, None)
        return None if entry is None else entry[1]

    def popOldest(self) -> tuple[_K, _V]:
        """Forget the oldest entry without expiring it."""
        key, (_, value) = self._entries.popitem(last=False)
        return key, value

    def values(self) -> list[_V]:
        """Every value, oldest first."""
        return [value for _, value in self._entries.values()]

    def clear(self) -> None:
        """Forget everything and stop the timer."""
        self._entries.clear()
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None

    def _sweep(self) -> None:
        self._call = None
        # add() called from an expiry callback must not arm a later call
        self._sweeping = True
        entries = self._entries
        now = self._clock.seconds()
        try:
            while entries:
                key, (deadline, value) = next(iter(entries.items()))
                if deadline > now:
                    break
                del entries[key]
                if self._expired is not None:
                    self._expired(key, value)
        finally:
            self._sweeping = False
            if entries and self._call is None:
                deadline = next(iter(entries.values()))[0]
                self._call = self._clock.callLater(
                    max(deadline - now, SWEEP_GRANULARITY), self._sweep
                )


def _delayUntil(now: float, deadline: float) -> float:
    """
    The delay that makes a call scheduled at C{now} fire at C{deadline},
    never after it (C{now + delay} may round up by one unit otherwise).
    """
    delay = max(deadline - now, 0.0)
    while delay > 0 and now + delay > deadline:
        delay = math.nextafter(delay, 0.0)
    return delay


class _FirstRetransmissions:
    """
    UDP client transactions waiting for Timer E's first firing, T1 after
    their request went out. Every one waits the same delay, so they are
    kept in send order (hence deadline order) and watched by one
    L{IDelayedCall} armed at the exact deadline of the oldest one still
    waiting; each fires at the very time its own timer would have.

    A transaction that ends before (the usual case: answered within T1)
    only leaves the count of those waiting; its entry is dropped when it
    reaches the front. Once none is waiting the call is cancelled.
    """

    def __init__(self, clock: IReactorTime, delay: float) -> None:
        self._clock = clock
        self._delay = delay
        self._entries: deque[tuple[float, _ClientTransaction]] = deque()
        self._waiting = 0
        self._call: IDelayedCall | None = None
        self._firing = False

    def add(self, txn: _ClientTransaction) -> None:
        """Fire C{txn.retransmit()} one delay from now, unless it ends before."""
        self._entries.append((self._clock.seconds() + self._delay, txn))
        self._waiting += 1
        txn.queued = True
        if self._call is None and not self._firing:
            self._call = self._clock.callLater(self._delay, self._fire)

    def discard(self, txn: _ClientTransaction) -> None:
        """C{txn} (queued) no longer waits."""
        txn.queued = False
        self._waiting -= 1
        if not self._waiting:
            self.clear()

    def clear(self) -> None:
        """Forget every entry and stop the call."""
        for _, txn in self._entries:
            txn.queued = False
        self._entries.clear()
        self._waiting = 0
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None

    def _fire(self) -> None:
        self._call = None
        self._firing = True
        entries = self._entries
        now = self._clock.seconds()
        try:
            while entries:
                deadline, txn = entries[0]
                if not txn.queued:
                    entries.popleft()
                    continue
                if deadline > now:
                    break
                entries.popleft()
                txn.queued = False
                self._waiting -= 1
                txn.retransmit()
        finally:
            self._firing = False
            if entries and self._call is None:
                self._call = self._clock.callLater(_delayUntil(now, entries[0][0]), self._fire)


_TRYING = "trying"
_PROCEEDING = "proceeding"
_COMPLETED = "completed"
_TERMINATED = "terminated"


class _ClientTransaction:
    """
    One request waiting for its final response: its retransmission state
    (Timer E) and timeout (Timer F) share one DelayedCall.

    The request is kept (for retransmissions) as its own head, with the
    Via, and the body as given: the transactions of one broadcast share
    one body object instead of a copy each (a 35 kB node list sent to
    1,000 nodes held 35 MB until the answers came, 32 s when none came).
    """

    __slots__ = (
        "body",
        "branch",
        "deferred",
        "destination",
        "head",
        "interval",
        "layer",
        "method",
        "queued",
        "state",
        "timeout",
        "timeoutAt",
        "timer",
    )

    def __init__(
        self,
        layer: TransactionLayer,
        branch: str,
        method: str,
        head: bytes,
        body: bytes,
        destination: Address,
        timeout: float,
    ) -> None:
        self.layer = layer
        self.branch = branch
        self.method = method
        self.head = head
        self.body = body
        self.destination = destination
        self.timeout = timeout
        self.state = _TRYING
        self.deferred: Deferred[Response] = Deferred(self.cancel)
        self.timer: IDelayedCall | None = None
        self.interval = layer.policy.t1
        self.timeoutAt = 0.0
        self.queued = False
        """Whether waiting in the layer's L{_FirstRetransmissions}."""

    def start(self) -> None:
        """
        Arm Timer E (unreliable transports; its first firing is shared, see
        L{_FirstRetransmissions}) or Timer F.
        """
        layer = self.layer
        clock = layer.clock
        self.timeoutAt = clock.seconds() + self.timeout
        if self.destination.reliable or self.interval >= self.timeout:
            self.timer = clock.callLater(self.timeout, self.timedOut)
        else:
            layer._firstRetransmissions.add(self)

    def retransmit(self) -> None:
        """Timer E fired: send again and re-arm E, or F when it comes first."""
        layer = self.layer
        layer.counters["client.retransmissions"] += 1
        if self.state == _PROCEEDING:
            self.interval = layer.policy.t2
        else:
            self.interval = min(2 * self.interval, layer.policy.t2)
        now = layer.clock.seconds()
        if now + self.interval >= self.timeoutAt:
            # late under load, now may already be past timeoutAt: never a negative delay
            self.timer = layer.clock.callLater(_delayUntil(now, self.timeoutAt), self.timedOut)
        else:
            self.timer = layer.clock.callLater(self.interval, self.retransmit)
        layer._sendClient(self)

    def timedOut(self) -> None:
        """Timer F fired."""
        self.timer = None
        self.layer.counters["client.timeouts"] += 1
        self.fail(
            TransactionTimeout(
                f"no final response from {self.destination} within {self.timeout:g} s"
            )
        )

    def transportFailed(self, failure: Failure) -> None:
        """The transport could not send the request (or a retransmission)."""
        if self.state in (_TRYING, _PROCEEDING):
            self.layer.counters["client.transport_failures"] += 1
            self.fail(TransportFailure(failure))

    def cancel(self, deferred: Deferred[Response]) -> None:
        """The caller cancelled the Deferred: forget the transaction."""
        if self.state in (_TRYING, _PROCEEDING):
            self.layer.counters["client.cancelled"] += 1
            self.terminate()

    def terminate(self) -> None:
        """Stop the timer, leave the layer's table and let the request go."""
        self.state = _TERMINATED
        self.head = self.body = b""
        if self.queued:
            self.layer._firstRetransmissions.discard(self)
        if self.timer is not None:
            if self.timer.active():
                self.timer.cancel()
            self.timer = None
        self.layer._forgetClient(self)

    def fail(self, error: TransactionError) -> None:
        """End without a final response."""
        self.terminate()
        self.deferred.errback(error)

    def responseReceived(self, response: Response) -> None:
        """A response matched this transaction (RFC 3261 §17.1.2.2)."""
        if response.code < 200:
            self.state = _PROCEEDING
            self.layer.counters["client.provisional_responses"] += 1
            return
        self.terminate()
        self.layer.counters["client.completed"] += 1
        self.layer._clientCompleted(self)
        self.deferred.callback(response)


class _ServerTransaction:
    """One request handed to the application, waiting for its response."""

    __slots__ = ("callId", "key", "origin", "request", "state", "via")

    def __init__(
        self, key: Hashable, request: Request, origin: Origin, via: str, callId: str
    ) -> None:
        self.key = key
        self.request = request
        self.origin = origin
        self.via = via
        self.callId = callId
        self.state = _TRYING


@implementer(ISIPMessageReceiver, ISIPClient)
class TransactionLayer:
    """
    RFC 3261 non-INVITE client and server transactions over one
    L{ISIPTransport}; the receiver of everything the transports parse.

    @ivar handler: the application (the bus) that new requests are handed
        to; may be set after construction. Requests arriving while it is
        None are answered C{503 Service Unavailable}.
    @ivar counters: how many times each notable thing happened, by name.
        Client side: C{client.started}, C{client.completed} (final response
        received), C{client.retransmissions}, C{client.provisional_responses},
        C{client.timeouts}, C{client.transport_failures},
        C{client.cancelled}, C{client.rejected_limit},
        C{client.duplicate_branch}, C{client.responses_absorbed}
        (retransmitted responses during Timer K),
        C{client.completed_evicted}. Server side: C{server.started},
        C{server.responses_sent}, C{server.retransmissions_absorbed}
        (while the application works), C{server.responses_resent} (after
        it answered), C{server.handler_errors}, C{server.response_timeouts},
        C{server.late_responses}, C{server.rejected_limit} (503),
        C{server.completed_evicted}. Messages: C{responses.unmatched},
        C{responses.malformed}, C{requests.rejected} (every stateless 4xx/5xx
        answer), C{requests.ack_dropped}, C{requests.dropped_no_via},
        C{requests.dropped_bad_via}, C{requests.unparseable_dropped},
        C{requests.no_handler}, C{messages.dropped_stopped},
        C{errors.internal}.
    """

    log = Logger()

    def __init__(
        self,
        transport: ISIPTransport,
        handler: ISIPRequestHandler | None,
        clock: IReactorTime,
        viaHost: str,
        viaPort: int,
        policy: TimerPolicy = TimerPolicy(),
        limits: TransactionLimits = TransactionLimits(),
        branchSource: Callable[[], str] | None = None,
    ) -> None:
        self.transport = transport
        self.handler = handler
        self.clock = clock
        self.policy = policy
        self.limits = limits
        self.counters: Counter[str] = Counter()
        if ":" in viaHost and not viaHost.startswith("["):
            viaHost = f"[{viaHost}]"
        self._sentBy = f"{viaHost}:{viaPort}"
        self._viaPrefixes: dict[str, str] = {}
        if branchSource is None:
            branchSource = _makeBranchSource()
        self._branchSource = branchSource
        self._tagSource = _makeTagSource()
        self._stopped = False
        self._clients: dict[str, _ClientTransaction] = {}
        self._clientsCompleted: _ExpiryQueue[str, str] = _ExpiryQueue(clock, policy.timerK)
        self._firstRetransmissions = _FirstRetransmissions(clock, policy.t1)
        self._serversPending: _ExpiryQueue[Hashable, _ServerTransaction] = _ExpiryQueue(
            clock, limits.serverResponseTimeout, self._serverResponseTimedOut
        )
        self._serversCompleted: _ExpiryQueue[Hashable, bytes] = _ExpiryQueue(clock, policy.timerJ)

    # ------------------------------------------------------------------
    # statistics

    @property
    def openClientTransactions(self) -> int:
        """Client transactions waiting for a final response."""
        return len(self._clients)

    @property
    def openServerTransactions(self) -> int:
        """Server transactions waiting for the application's response."""
        return len(self._serversPending)

    @property
    def completedClientTransactions(self) -> int:
        """Completed client transactions still absorbing retransmitted responses."""
        return len(self._clientsCompleted)

    @property
    def completedServerTransactions(self) -> int:
        """Completed server transactions still answering retransmitted requests."""
        return len(self._serversCompleted)

    # ------------------------------------------------------------------
    # ISIPClient

    def request(
        self, request: Request, destination: Address, timeout: float | None = None
    ) -> Deferred[Response]:
        """
        Send C{request} to C{destination} in a new client transaction; see
        L{ISIPClient.request}. Fails with L{TransactionError} once the layer
        is stopped.

        @raise ValueError: C{timeout} is not positive.
        """
        if timeout is None:
            timeout = self.policy.timerF
        elif not timeout > 0:
            raise ValueError(f"timeout must be positive, not {timeout!r}")
        if self._stopped:
            return defer.fail(TransactionError("transaction layer stopped"))
        if len(self._clients) >= self.limits.maxClientTransactions:
            self.counters["client.rejected_limit"] += 1
            return defer.fail(TooManyTransactions(self.limits.maxClientTransactions))
        branch = self._branchSource()
        if branch in self._clients or self._clientsCompleted.get(branch) is not None:
            self.counters["client.duplicate_branch"] += 1
            return defer.fail(TransactionError(f"branch {branch!r} already in use"))
        prefix = self._viaPrefixes.get(destination.transport)
        if prefix is None:
            prefix = f"Via: SIP/2.0/{destination.transport.upper()} {self._sentBy};branch="
            self._viaPrefixes[destination.transport] = prefix
        # the head of request.withHeaders(request.headers.prepending("Via",
        # ...)).toBytes(), without rebuilding the header index: the new Via
        # line goes right after the start line
        serialized = request.headBytes()
        startLineEnd = serialized.index(b"\r\n") + 2
        head = b"".join(
            (
                serialized[:startLineEnd],
                (prefix + branch).encode(ENCODING, ERRORS),
                b"\r\n",
                serialized[startLineEnd:],
            )
        )
        txn = _ClientTransaction(
            self, branch, request.method, head, request.body, destination, timeout
        )
        self._clients[branch] = txn
        self.counters["client.started"] += 1
        txn.start()
        self._sendClient(txn)
        if destination.reliable:
            txn.head = txn.body = b""  # never sent again
        return txn.deferred

    def _sendClient(self, txn: _ClientTransaction) -> None:
        """Hand a client transaction's request to the transport."""
        data = txn.head + txn.body if txn.body else txn.head
        try:
            self.transport.send(data, txn.destination, txn.transportFailed)
        except Exception:
            txn.transportFailed(Failure())  # type: ignore[no-untyped-call]

    def _forgetClient(self, txn: _ClientTransaction) -> None:
        """A client transaction left Trying or Proceeding."""
        if self._clients.get(txn.branch) is txn:
            del self._clients[txn.branch]

    def _clientCompleted(self, txn: _ClientTransaction) -> None:
        """A client transaction got its final response: Timer K."""
        if txn.destination.reliable:
            return
        completed = self._clientsCompleted
        if len(completed) >= self.limits.maxCompletedTransactions:
            completed.popOldest()
            self.counters["client.completed_evicted"] += 1
        completed.add(txn.branch, txn.method)

    def _responseReceived(self, response: Response) -> None:
        raw = response.headers.get("via")
        branch = None if raw is None else _fastBranch(raw)
        cseq = response.headers.cseq()
        if branch is None or cseq is None:
            self.counters["responses.malformed"] += 1
            self.log.debug(
                "Dropped a {code} response without a Via branch or CSeq", code=response.code
            )
            return
        txn = self._clients.get(branch)
        if txn is not None and txn.method == cseq[1]:
            txn.responseReceived(response)
            return
        if self._clientsCompleted.get(branch) == cseq[1]:
            self.counters["client.responses_absorbed"] += 1
            return
        self.counters["responses.unmatched"] += 1
        self.log.debug(
            "Dropped a {code} response matching no transaction (branch {branch})",
            code=response.code,
            branch=branch,
        )

    # ------------------------------------------------------------------
    # ISIPMessageReceiver

    def messageReceived(self, message: Message, origin: Origin) -> None:
        """
        Match a response to its client transaction, or a request to its
        server transaction (creating one and calling the handler when it is
        new). Never raises.
        """
        try:
            if self._stopped:
                self.counters["messages.dropped_stopped"] += 1
            elif isinstance(message, Response):
                self._responseReceived(message)
            else:
                self._requestReceived(message, origin)
        except Exception:
            self.counters["errors.internal"] += 1
            self.log.failure("Error handling a message from {origin}", origin=origin)

    def unparseableRequest(self, error: SIPParseError, origin: Origin) -> None:
        """
        Answer a request that cannot be accepted with C{error.status} and
        C{error.reason} as the reason phrase, statelessly; drop it when it
        has no usable top Via. Never raises.
        """
        try:
            headers = error.headers
            via = None if headers is None else _topViaRaw(headers)
            if headers is None or via is None or self._stopped:
                self.counters["requests.unparseable_dropped"] += 1
                return
            try:
                Via.parse(via)
            except SIPParseError:
                self.counters["requests.unparseable_dropped"] += 1
                return
            cseq = headers.cseq()
            if cseq is not None and cseq[1] == "ACK":
                self.counters["requests.ack_dropped"] += 1
                return
            reason = error.reason.replace("\r", " ").replace("\n", " ")
            self.counters["requests.rejected"] += 1
            self._replyStateless(headers, origin, via, error.status, reason)
        except Exception:
            self.counters["errors.internal"] += 1
            self.log.failure("Error answering an unparseable request from {origin}", origin=origin)

    def _replyStateless(
        self, headers: Headers, origin: Origin, via: str, code: int, reason: str | None = None
    ) -> None:
        response = makeResponse(headers, code, reason, toTag=self._tagSource())
        self.transport.reply(response.toBytes(), origin, via)

    def _reject(
        self, request: Request, origin: Origin, via: str, code: int, reason: str | None = None
    ) -> None:
        self.counters["requests.rejected"] += 1
        self._replyStateless(request.headers, origin, via, code, reason)

    def _requestReceived(self, request: Request, origin: Origin) -> None:
        method = request.method
        if method == "ACK":
            self.counters["requests.ack_dropped"] += 1
            return
        headers = request.headers
        viaRaw = _topViaRaw(headers)
        if viaRaw is None:
            self.counters["requests.dropped_no_via"] += 1
            self.log.debug("Dropped a {method} request without Via", method=method)
            return
        try:
            via = Via.parse(viaRaw)
        except SIPParseError:
            self.counters["requests.dropped_bad_via"] += 1
            self.log.debug("Dropped a {method} request with a bad Via", method=method)
            return
        branch = via.branch
        if not branch:
            self._reject(request, origin, viaRaw, 400, "Missing Via branch")
            return
        callId = headers.get("call-id")
        if not callId:
            self._reject(request, origin, viaRaw, 400, "Missing Call-ID")
            return
        if "from" not in headers:
            self._reject(request, origin, viaRaw, 400, "Missing From")
            return
        if "to" not in headers:
            self._reject(request, origin, viaRaw, 400, "Missing To")
            return
        cseq = headers.cseq()
        if cseq is None:
            reason = "Bad CSeq" if "cseq" in headers else "Missing CSeq"
            self._reject(request, origin, viaRaw, 400, reason)
            return
        if cseq[1] != method:
            self._reject(request, origin, viaRaw, 400, "CSeq method mismatch")
            return
        maxForwards = headers.maxForwards()
        if maxForwards is None:
            if "max-forwards" in headers:
                self._reject(request, origin, viaRaw, 400, "Bad Max-Forwards")
                return
        elif maxForwards == 0:
            self._reject(request, origin, viaRaw, 483, "Too Many Hops")
            return

        key: Hashable
        if branch.startswith(MAGIC_COOKIE):
            key = _serverKey(branch, via, method)
        else:
            try:
                fromTag = NameAddr.parse(headers.get("from") or "").tag
            except SIPParseError:
                self._reject(request, origin, viaRaw, 400, "Bad From")
                return
            key = (callId, cseq[0], method, fromTag, str(via), "rfc2543")

        if self._serversPending.get(key) is not None:
            self.counters["server.retransmissions_absorbed"] += 1
            return
        stored = self._serversCompleted.get(key)
        if stored is not None:
            self.counters["server.responses_resent"] += 1
            self.transport.reply(stored, origin, viaRaw)
            return

        handler = self.handler
        if handler is None:
            self.counters["requests.no_handler"] += 1
            self._reject(request, origin, viaRaw, 503, "Service Unavailable")
            return
        if len(self._serversPending) >= self.limits.maxServerTransactions:
            self.counters["server.rejected_limit"] += 1
            self._reject(request, origin, viaRaw, 503, "Service Unavailable")
            return

        txn = _ServerTransaction(key, request, origin, viaRaw, callId)
        self._serversPending.add(key, txn)
        self.counters["server.started"] += 1
        try:
            result: object = handler.requestReceived(request, origin)
        except Exception:
            self._handlerFailed(Failure(), txn)  # type: ignore[no-untyped-call]
            return
        if isinstance(result, Response):
            self._handlerResponded(result, txn)
            return
        if isinstance(result, Coroutine):
            result = Deferred.fromCoroutine(result)
        if isinstance(result, Deferred):
            result.addCallbacks(
                self._handlerResponded,
                self._handlerFailed,
                callbackArgs=(txn,),
                errbackArgs=(txn,),
            )
        else:
            self._handlerResponded(result, txn)

    def _handlerResponded(self, response: object, txn: _ServerTransaction) -> None:
        if not isinstance(response, Response) or not response.isFinal:
            try:
                raise TypeError(f"the handler returned {response!r}, not a final Response")
            except TypeError:
                self._handlerFailed(Failure(), txn)  # type: ignore[no-untyped-call]
            return
        if txn.state != _TRYING:
            self.counters["server.late_responses"] += 1
            self.log.info(
                "Dropped the application's {code} response for call {callId}: too late",
                code=response.code,
                callId=txn.callId,
            )
            return
        self._serverRespond(txn, response)

    def _handlerFailed(self, failure: Failure, txn: _ServerTransaction) -> None:
        self.counters["server.handler_errors"] += 1
        self.log.failure(
            "The application failed to answer {method} call {callId}",
            failure,
            method=txn.request.method,
            callId=txn.callId,
        )
        if txn.state != _TRYING:
            return
        self._serverRespond(txn, self._internalError(txn))

    def _serverRespond(self, txn: _ServerTransaction, response: Response) -> None:
        """Send the final response of a server transaction and complete it."""
        toValue = response.headers.get("to")
        if toValue is not None and not _hasTag(toValue):
            response = attrs.evolve(
                response,
                headers=response.headers.replacing("To", f"{toValue};tag={self._tagSource()}"),
            )
        data = response.toBytes()
        txn.state = _COMPLETED
        self._serversPending.pop(txn.key)
        if not txn.origin.address.reliable:
            completed = self._serversCompleted
            if len(completed) >= self.limits.maxCompletedTransactions:
                completed.popOldest()
                self.counters["server.completed_evicted"] += 1
            completed.add(txn.key, data)
        self.counters["server.responses_sent"] += 1
        try:
            self.transport.reply(data, txn.origin, txn.via)
        except Exception:
            self.counters["errors.internal"] += 1
            self.log.failure(
                "Could not send the {code} response for call {callId}",
                code=response.code,
                callId=txn.callId,
            )

    def _serverResponseTimedOut(self, key: Hashable, txn: _ServerTransaction) -> None:
        self.counters["server.response_timeouts"] += 1
        self.log.warn(
            "No response from the application to {method} call {callId}"
            " within {timeout} s: answered 500",
            method=txn.request.method,
            callId=txn.callId,
            timeout=self.limits.serverResponseTimeout,
        )
        self._serverRespond(txn, self._internalError(txn))

    def _internalError(self, txn: _ServerTransaction) -> Response:
        return makeResponse(
            txn.request.headers, 500, "Server Internal Error", toTag=self._tagSource()
        )

    # ------------------------------------------------------------------
    # life cycle

    def stop(self) -> Deferred[None]:
        """
        Stop: every pending client transaction fails with
        L{TransactionError}, every timer is cancelled, every later request
        or message is refused. Fires when done.
        """
        self._stopped = True
        pending = list(self._clients.values())
        for server in self._serversPending.values():
            server.state = _TERMINATED
        self._serversPending.clear()
        self._serversCompleted.clear()
        self._clientsCompleted.clear()
        self._firstRetransmissions.clear()
        for txn in pending:
            txn.fail(TransactionError("transaction layer stopped"))
        return defer.succeed(None)


def _serverKey(branch: str, via: Via, method: str) -> str:
    """
    The RFC 3261 §17.2.3 key of a server transaction (branch, sent-by,
    method) as one string. It stays for Timer J with every completed
    transaction: a tuple of the four parsed objects took 240 bytes, the
    string about 90. The method (no blank) and the port come first and the
    host has its length, so two different triples never give one string.
    """
    host, port = via.sentBy
    return f"{method} {port} {len(host)} {host}{branch}"


def _topViaRaw(headers: Headers) -> str | None:
    """The first Via value as written, or None."""
    raw = headers.get("via")
    if raw is None:
        return None
    if "," in raw:
        raw = splitCommaValues(raw)[0]
    return raw.strip()


def _fastBranch(raw: str) -> str | None:
    """The branch parameter of the first Via value in C{raw}, or None."""
    if "," in raw:
        raw = splitCommaValues(raw)[0]
    semi = raw.find(";")
    if semi < 0:
        return None
    for param in raw[semi + 1 :].split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "branch":
            return value.strip() or None
    return None


def _hasTag(nameAddr: str) -> bool:
    """Whether a To value carries a C{tag} header parameter."""
    paramsAt = nameAddr.rfind(">") + 1
    return ";tag=" in nameAddr[paramsAt:].lower().replace(" ", "")


def _makeBranchSource() -> Callable[[], str]:
    """Unique branches: the magic cookie, a random per-layer prefix and a counter."""
    prefix = f"{MAGIC_COOKIE}{secrets.token_hex(8)}."
    counter = itertools.count(secrets.randbelow(1 << 32))
    return lambda: f"{prefix}{next(counter):x}"


def _makeTagSource() -> Callable[[], str]:
    """Unique To-tags: a random per-layer prefix and a counter, in hex."""
    prefix = f"{secrets.token_hex(16)}."
    counter = itertools.count(secrets.randbelow(1 << 32))
    return lambda: f"{prefix}{next(counter):08x}"
