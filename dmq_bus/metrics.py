"""
Prometheus metrics of one node: the flat counters of every layer (see
L{dmq_bus.service.NodeStack.stats}) mapped to metric families with labels,
plus gauges of the node's state, written in the Prometheus text exposition
format 0.0.4 (served at C{GET /metrics} by L{dmq_bus.control}).

The whole mapping is one table, L{FAMILIES}: each family has its name, type,
help text and the counter names it is made of (an exact name with fixed
labels, or a regular expression whose named groups become labels). A
counter that no row names goes to L{GENERIC}, C{dmq_counter_total{name=...}},
so nothing a layer counts is hidden. Families without counter sources are
filled from the node's state by the caller (L{collect}'s C{state}).

Counters named by an exact row are always exported, 0 until they first
count, so that C{rate()} sees them from the start; gauges and
regular-expression rows only once they have a value.

No dependency: the writer is L{render}, some twenty lines.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence

import attrs

COUNTER = "counter"
GAUGE = "gauge"

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
"""The C{Content-Type} of the text exposition format 0.0.4."""

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")

Labels = tuple[tuple[str, str], ...]
"""A sample's labels, as C{(name, value)} pairs in a fixed order."""

Sample = tuple[Labels, float]
"""One value of a family with its labels."""


@attrs.frozen
class Source:
    """
    Counter names that feed a family.

    @ivar name: an exact counter name, or (C{regex}) a regular expression
        matched against the whole name, whose named groups are labels.
    @ivar labels: fixed labels of every sample from this source.
    """

    name: str
    labels: Labels = ()
    regex: bool = False

    @property
    def pattern(self) -> re.Pattern[str]:
        """The compiled expression (C{regex} sources only)."""
        return re.compile(self.name)


def exact(name: str, **labels: str) -> Source:
    """The counter called C{name}, with fixed C{labels}."""
    return Source(name, tuple(labels.items()))


def matching(expression: str, **labels: str) -> Source:
    """Every counter whose whole name matches C{expression}; its groups are labels."""
    return Source(expression, tuple(labels.items()), regex=True)


@attrs.frozen
class FamilySpec:
    """
    One metric family: its name (with C{dmq_} prefix; a counter's ends in
    C{_total}), type, help line and the counters it is made of (none for a
    family filled from the node's state).
    """

    name: str
    type: str
    help: str
    sources: tuple[Source, ...] = ()

    def __attrs_post_init__(self) -> None:
        if not _METRIC_NAME.match(self.name) or not self.name.startswith("dmq_"):
            raise ValueError(f"bad metric family name {self.name!r}")
        if self.type not in (COUNTER, GAUGE):
            raise ValueError(f"{self.name}: type must be counter or gauge, not {self.type!r}")
        if (self.type == COUNTER) != self.name.endswith("_total"):
            raise ValueError(f"{self.name}: counters, and only counters, end in _total")
        for source in self.sources:
            names = [n for n, _ in source.labels]
            if source.regex:
                names += list(source.pattern.groupindex)
            for label in names:
                if not _LABEL_NAME.match(label) or label.startswith("__"):
                    raise ValueError(f"{self.name}: bad label name {label!r}")


def family(name: str, type: str, help: str, *sources: Source) -> FamilySpec:
    """A row of L{FAMILIES}."""
    return FamilySpec(name, type, help, sources)


_CHANNEL = r"(?P<channel>.+)"
_CODE = r"(?P<code>[0-9]+)"

# fmt: off
FAMILIES: tuple[FamilySpec, ...] = (
    # -- the bus (dmq_bus/bus/dispatch.py) -----------------------------------------------
    family("dmq_messages_received_total", COUNTER,
           "KDMQ requests received and handed to the peer of their channel.",
           matching(rf"in\.requests\.{_CHANNEL}")),
    family("dmq_responses_sent_total", COUNTER,
           "Final responses sent to received KDMQ requests, per channel and status code.",
           matching(rf"in\.responses\.{_CHANNEL}\.{_CODE}")),
    family("dmq_messages_sent_total", COUNTER,
           "KDMQ requests sent, per channel.",
           matching(rf"out\.requests\.{_CHANNEL}")),
    family("dmq_responses_received_total", COUNTER,
           "Final responses received to sent KDMQ requests, per channel and status code.",
           matching(rf"out\.responses\.{_CHANNEL}\.{_CODE}")),
    family("dmq_send_failures_total", COUNTER,
           "Sent KDMQ requests that got no response: 408 timeout or transport error, "
           "503 local limit.",
           matching(rf"out\.failures\.{_CHANNEL}\.{_CODE}")),
    family("dmq_peer_errors_total", COUNTER,
           "Peers that raised or failed on a received message (answered 500), per channel.",
           matching(rf"in\.peer_errors\.{_CHANNEL}")),
    family("dmq_requests_refused_total", COUNTER,
           "Received requests no peer saw: 405 method, 400 no channel, 404 unknown channel.",
           exact("in.method_not_allowed", reason="method_not_allowed"),
           exact("in.no_channel", reason="no_channel"),
           exact("in.unknown_channel", reason="unknown_channel")),
    family("dmq_responses_downgraded_total", COUNTER,
           "200 answers with a body sent as 202 to a Kamailio sender (it would parse the body).",
           exact("out.downgraded_200_with_body")),
    # -- membership (dmq_bus/bus/nodelist.py, notification.py) ---------------------------
    family("dmq_membership_changes_total", COUNTER,
           "Node list changes: nodes added, status changes, nodes removed.",
           exact("membership.added", change="added"),
           exact("membership.status", change="status"),
           exact("membership.removed", change="removed")),
    family("dmq_nodes_rejected_total", COUNTER,
           "New nodes not added because the node list was full.",
           exact("nodes.rejected_limit")),
    family("dmq_nodelist_bad_lines_total", COUNTER,
           "Received node-list lines skipped as unparsable.",
           exact("nodelist.bad_lines")),
    family("dmq_nodelist_ghosts_ignored_total", COUNTER,
           "Received node-list lines naming a recently removed node, ignored.",
           exact("nodelist.ghosts_ignored")),
    family("dmq_health_events_total", COUNTER,
           "Failure detection between dmq-bus nodes (probes, indirect probes, suspicions, "
           "refutations, nodes failed or revived), by event.",
           matching(r"health\.(?P<event>[a-z_.]+)")),
    family("dmq_nodes_failed_total", COUNTER,
           "Nodes marked disabled (no answer) and removed (no answer while disabled).",
           exact("notification.nodes_disabled", change="disabled"),
           exact("notification.nodes_removed", change="removed")),
    family("dmq_requests_forbidden_total", COUNTER,
           "Requests refused with 403 by membership control, by reason (not_tls, network, "
           "unknown_node, unsigned, bad_signature, stale, replayed).",
           exact("in.forbidden.not_tls", reason="not_tls"),
           exact("in.forbidden.network", reason="network"),
           exact("in.forbidden.unknown_node", reason="unknown_node"),
           exact("in.forbidden.unsigned", reason="unsigned"),
           exact("in.forbidden.bad_signature", reason="bad_signature"),
           exact("in.forbidden.stale", reason="stale"),
           exact("in.forbidden.replayed", reason="replayed"),
           matching(r"in\.forbidden\.(?P<reason>[a-z_]+)")),
    family("dmq_discovery_events_total", COUNTER,
           "DNS seed discovery: resolutions, failures, seeds added and dropped, truncations.",
           matching(r"discovery\.(?P<event>[a-z_]+)")),
    family("dmq_notification_joins_total", COUNTER,
           "Times this node joined a bus (first notification exchanged).",
           exact("notification.joins")),
    family("dmq_notification_rebroadcasts_total", COUNTER,
           "Received node lists that changed ours and were passed on to every node.",
           exact("notification.rebroadcasts")),
    family("dmq_notification_leave_sent_total", COUNTER,
           "Leave announcements sent on stop.",
           exact("notification.leave_sent")),
    family("dmq_notification_answers_ignored_total", COUNTER,
           "Answers to notifications that change nothing (neither 200 nor 408), per code.",
           matching(rf"notification\.answers_ignored\.{_CODE}")),
    family("dmq_notification_local_failures_total", COUNTER,
           "Notifications that could not be sent for a local reason.",
           exact("notification.local_failures")),
    family("dmq_notification_events_total", COUNTER,
           "Membership repairs: removed nodes asked directly when a list names them "
           "(knocks sent, answered), late failures of pings sent before a node came back "
           "(ignored), nodes revived by their own request, plain nodes in lists skipped "
           "under tls-only.",
           exact("notification.knocks_sent", event="knocks_sent"),
           exact("notification.knocks_answered", event="knocks_answered"),
           exact("notification.stale_failures_ignored", event="stale_failures_ignored"),
           exact("notification.revived_by_request", event="revived_by_request"),
           exact("notification.lines_not_tls", event="lines_not_tls")),
    family("dmq_node_list_size", GAUGE,
           "Nodes in the node list, the local node included.",
           exact("nodes.total")),
    family("dmq_nodes", GAUGE,
           "Nodes in the node list per status, the local node included."),
    # -- SIP transactions (dmq_bus/sip/transaction.py) -----------------------------------
    family("dmq_sip_transactions_open", GAUGE,
           "Open transactions: client waiting for a final response, server for the peer's "
           "answer.",
           exact("transactions.client_open", side="client"),
           exact("transactions.server_open", side="server")),
    family("dmq_sip_transactions_completed", GAUGE,
           "Completed transactions kept to absorb retransmissions (Timer K, J)."),
    family("dmq_sip_transactions_started_total", COUNTER,
           "Transactions started: requests sent (client), new requests received (server).",
           exact("client.started", side="client"),
           exact("server.started", side="server")),
    family("dmq_sip_transactions_finished_total", COUNTER,
           "Transactions that got (client) or sent (server) their final response.",
           exact("client.completed", side="client"),
           exact("server.responses_sent", side="server")),
    family("dmq_sip_transaction_timeouts_total", COUNTER,
           "Transactions timed out: client without final response (408), server without "
           "the peer's answer (500).",
           exact("client.timeouts", side="client"),
           exact("server.response_timeouts", side="server")),
    family("dmq_sip_transactions_rejected_total", COUNTER,
           "Transactions refused at the open-transaction limit (client: send fails, server: "
           "503).",
           exact("client.rejected_limit", side="client"),
           exact("server.rejected_limit", side="server")),
    family("dmq_sip_transactions_evicted_total", COUNTER,
           "Completed transactions forgotten early at the completed-transaction limit.",
           exact("client.completed_evicted", side="client"),
           exact("server.completed_evicted", side="server")),
    family("dmq_sip_retransmissions_total", COUNTER,
           "Requests retransmitted by client transactions (UDP, Timer E).",
           exact("client.retransmissions")),
    family("dmq_sip_retransmissions_absorbed_total", COUNTER,
           "Retransmissions received and absorbed: requests while the peer works, responses "
           "after the final one.",
           exact("server.retransmissions_absorbed", message="request"),
           exact("client.responses_absorbed", message="response")),
    family("dmq_sip_responses_resent_total", COUNTER,
           "Final responses sent again for a retransmitted request.",
           exact("server.responses_resent")),
    family("dmq_sip_provisional_responses_total", COUNTER,
           "Provisional (1xx) responses received.",
           exact("client.provisional_responses")),
    family("dmq_sip_transport_failures_total", COUNTER,
           "Client transactions ended because the request could not be sent.",
           exact("client.transport_failures")),
    family("dmq_sip_transactions_cancelled_total", COUNTER,
           "Client transactions cancelled (node stopping).",
           exact("client.cancelled")),
    family("dmq_sip_duplicate_branches_total", COUNTER,
           "Requests refused because their Via branch was already in use.",
           exact("client.duplicate_branch")),
    family("dmq_sip_handler_errors_total", COUNTER,
           "Requests whose handler raised (answered 500).",
           exact("server.handler_errors")),
    family("dmq_sip_late_responses_total", COUNTER,
           "Peer answers that came after their transaction had timed out.",
           exact("server.late_responses")),
    family("dmq_sip_requests_rejected_total", COUNTER,
           "Requests answered statelessly with a 4xx or 5xx.",
           exact("requests.rejected")),
    family("dmq_sip_messages_dropped_total", COUNTER,
           "Received messages dropped without an answer, per reason.",
           exact("responses.unmatched", reason="unmatched_response"),
           exact("responses.malformed", reason="malformed_response"),
           exact("requests.ack_dropped", reason="ack"),
           exact("requests.dropped_no_via", reason="no_via"),
           exact("requests.dropped_bad_via", reason="bad_via"),
           exact("requests.unparseable_dropped", reason="unparseable_request"),
           exact("requests.no_handler", reason="no_handler"),
           exact("messages.dropped_stopped", reason="stopped"),
           exact("dropped_no_receiver", reason="no_receiver")),
    family("dmq_sip_internal_errors_total", COUNTER,
           "Unexpected errors caught inside the SIP layers (see the log).",
           exact("errors.internal", layer="transactions"),
           exact("receiver_errors", layer="transport")),
    # -- SIP transports (dmq_bus/sip/transport.py) ---------------------------------------
    family("dmq_sip_messages_received_total", COUNTER,
           "SIP messages received, per transport.",
           exact("udp.received", transport="udp"),
           exact("tcp.received", transport="tcp")),
    family("dmq_sip_messages_sent_total", COUNTER,
           "SIP messages sent, per transport.",
           exact("udp.sent", transport="udp"),
           exact("tcp.sent", transport="tcp")),
    family("dmq_sip_parse_errors_total", COUNTER,
           "Received bytes that were no SIP message (dropped), per transport.",
           exact("udp.parse_errors", transport="udp"),
           exact("tcp.parse_errors", transport="tcp")),
    family("dmq_sip_unparseable_requests_total", COUNTER,
           "Received requests with parsable headers but a bad message (answered 4xx), per "
           "transport.",
           exact("udp.unparseable_requests", transport="udp"),
           exact("tcp.unparseable_requests", transport="tcp")),
    family("dmq_sip_send_errors_total", COUNTER,
           "Messages that could not be sent, whatever the reason.",
           exact("send_errors")),
    family("dmq_sip_oversize_messages_total", COUNTER,
           "Messages over the size limit (not sent, or refused on receipt).",
           exact("oversize")),
    family("dmq_sip_keepalives_total", COUNTER,
           "CRLF keep-alives received and keep-alive pings answered.",
           exact("keepalives")),
    family("dmq_sip_udp_send_buffer_full_total", COUNTER,
           "Datagrams not sent because the socket's send buffer was full.",
           exact("udp.send_buffer_full")),
    family("dmq_sip_udp_send_refused_total", COUNTER,
           "Earlier datagrams the kernel reported refused (ICMP port unreachable).",
           exact("udp.send_refused")),
    family("dmq_sip_udp_receive_buffer_bytes", GAUGE,
           "The UDP socket's receive buffer, as the kernel granted it.",
           exact("udp.receive_buffer")),
    family("dmq_sip_tcp_connections_opened_total", COUNTER,
           "TCP connections opened, in and out.",
           exact("tcp.connections_opened")),
    family("dmq_sip_tcp_connections_closed_total", COUNTER,
           "TCP connections closed.",
           exact("tcp.connections_closed")),
    family("dmq_sip_tcp_connections_refused_total", COUNTER,
           "TCP connections refused at the connection limit.",
           exact("tcp.connections_refused_limit")),
    family("dmq_sip_tcp_connect_failures_total", COUNTER,
           "Outgoing TCP connections that could not be made.",
           exact("tcp.connect_failed")),
    family("dmq_sip_tcp_idle_closed_total", COUNTER,
           "TCP connections closed for being idle.",
           exact("tcp.idle_closed")),
    family("dmq_sip_tcp_headers_too_long_total", COUNTER,
           "TCP connections closed because a header block exceeded its limit.",
           exact("tcp.headers_too_long")),
    family("dmq_sip_tls_failures_total", COUNTER,
           "TLS connections that failed, by reason: handshake_failed (outgoing: the "
           "handshake failed or stalled, e.g. the peer's certificate was refused), "
           "refused_by_peer (outgoing: the peer closed it with an alert after the "
           "handshake, e.g. it refused our certificate), inbound_failed (incoming: ended "
           "by a TLS error, e.g. a certificate we refused).",
           exact("tls.handshake_failed", reason="handshake_failed"),
           exact("tls.refused_by_peer", reason="refused_by_peer"),
           exact("tls.inbound_failed", reason="inbound_failed")),
    # -- replicated tables (dmq_bus/peers/htable.py) -------------------------------------
    family("dmq_htable_cells", GAUGE,
           "Live cells per table."),
    family("dmq_htable_actions_received_total", COUNTER,
           "Replicated writes received, per outcome.",
           exact("htable.in.applied", result="applied"),
           exact("htable.in.incomplete", result="incomplete"),
           exact("htable.in.table_full", result="table_full"),
           exact("htable.in.bad_pattern", result="bad_pattern"),
           exact("htable.in.bad_request", result="bad_request"),
           exact("htable.in.unknown_action", result="unknown_action"),
           exact("htable.in.unknown_table", result="unknown_table"),
           exact("htable.in.errors", result="error")),
    family("dmq_htable_expired_total", COUNTER,
           "Cells removed because their lifetime ended.",
           exact("htable.expired")),
    family("dmq_htable_replications_total", COUNTER,
           "Local writes sent to the bus.",
           exact("htable.replication.sent")),
    family("dmq_htable_replication_failures_total", COUNTER,
           "Node answers to replicated writes that were not 2xx, or did not come.",
           exact("htable.replication.failures")),
    family("dmq_htable_sync_requests_total", COUNTER,
           "Full-copy (sync) requests sent on join and received from joining nodes.",
           exact("htable.sync.requests_sent", direction="sent"),
           exact("htable.sync.requests_received", direction="received")),
    family("dmq_htable_sync_chunks_total", COUNTER,
           "Sync chunks sent and received.",
           exact("htable.sync.chunks_sent", direction="sent"),
           exact("htable.sync.chunks_received", direction="received")),
    family("dmq_htable_sync_chunk_failures_total", COUNTER,
           "Sent sync chunks not answered 2xx.",
           exact("htable.sync.chunk_failures")),
    family("dmq_htable_sync_cells_total", COUNTER,
           "Cells of received sync chunks, applied or skipped.",
           exact("htable.sync.cells_applied", result="applied"),
           exact("htable.sync.cells_skipped", result="skipped")),
    family("dmq_htable_sync_requester_problems_total", COUNTER,
           "Sync requests whose sender was missing (not answered) or unknown (answered to it "
           "alone).",
           exact("htable.sync.no_requester", requester="missing"),
           exact("htable.sync.unknown_requester", requester="unknown")),
    # -- the control API's event stream (dmq_bus/control.py) -----------------------------
    family("dmq_events_clients", GAUGE,
           "Clients connected to GET /events."),
    family("dmq_events_backlog", GAUGE,
           "Events waiting in the queues of /events clients that do not read fast enough."),
    family("dmq_events_sent_total", COUNTER,
           "Membership events written to /events clients (one per event and client).",
           exact("events.sent")),
    family("dmq_events_clients_total", COUNTER,
           "/events clients by outcome: accepted, refused at the client limit, disconnected "
           "for falling behind.",
           exact("events.clients_accepted", outcome="accepted"),
           exact("events.clients_refused_limit", outcome="refused_limit"),
           exact("events.clients_dropped_slow", outcome="dropped_slow")),
    # -- the node ------------------------------------------------------------------------
    family("dmq_node_info", GAUGE,
           "Always 1; labels: this node's URI and the dmq-bus version."),
)
# fmt: on

GENERIC = FamilySpec(
    "dmq_counter_total",
    COUNTER,
    "Counters no other family maps, by their flat name (see dmq.stats).",
)
"""Where counters that L{FAMILIES} does not name go, labelled with their name."""


@attrs.define
class MetricFamily:
    """A family with its samples, ready to be written."""

    spec: FamilySpec
    samples: list[Sample] = attrs.Factory(list)


class CounterMap:
    """
    Finds the family and labels of a flat counter name, from L{FAMILIES}:
    exact rows first, then expressions in table order; else L{GENERIC}.
    Remembers its answers (at most L{cacheLimit} names).
    """

    cacheLimit = 10_000

    def __init__(self, families: Sequence[FamilySpec] = FAMILIES) -> None:
        self.families = tuple(families)
        names = [f.name for f in self.families] + [GENERIC.name]
        if len(set(names)) != len(names):
            raise ValueError("metric family names must be unique")
        self._exact: dict[str, tuple[FamilySpec, Labels]] = {}
        self._patterns: list[tuple[re.Pattern[str], FamilySpec, Labels]] = []
        for spec in self.families:
            for source in spec.sources:
                if source.regex:
                    self._patterns.append((source.pattern, spec, source.labels))
                elif source.name in self._exact:
                    raise ValueError(f"counter {source.name!r} is mapped twice")
                else:
                    self._exact[source.name] = (spec, source.labels)
        self._cache: dict[str, tuple[FamilySpec, Labels]] = {}

    def exactNames(self) -> dict[str, tuple[FamilySpec, Labels]]:
        """Every exactly named counter with its family and labels."""
        return dict(self._exact)

    def classify(self, name: str) -> tuple[FamilySpec, Labels]:
        """The family and labels of counter C{name}."""
        found = self._exact.get(name) or self._cache.get(name)
        if found is not None:
            return found
        for pattern, spec, labels in self._patterns:
            match = pattern.fullmatch(name)
            if match is not None:
                found = (spec, labels + tuple(match.groupdict().items()))
                break
        else:
            found = (GENERIC, (("name", name),))
        if len(self._cache) >= self.cacheLimit:
            self._cache.clear()
        self._cache[name] = found
        return found


DEFAULT_MAP = CounterMap()


def collect(
    counters: Mapping[str, float],
    state: Mapping[str, Iterable[Sample]] | None = None,
    counterMap: CounterMap = DEFAULT_MAP,
) -> list[MetricFamily]:
    """
    Every family of L{FAMILIES} (in table order, then L{GENERIC}) with its
    samples: the C{counters} mapped through C{counterMap} (values of one
    family and label set are added up), exactly named counters that have
    not counted yet as 0, and the samples C{state} gives by family name.
    @raise KeyError: C{state} names a family that is not in the table.
    """
    values: dict[str, dict[Labels, float]] = {f.name: {} for f in counterMap.families}
    values[GENERIC.name] = {}
    for spec, labels in counterMap.exactNames().values():
        if spec.type == COUNTER:
            values[spec.name].setdefault(labels, 0)
    for name, value in counters.items():
        spec, labels = counterMap.classify(name)
        target = values[spec.name]
        target[labels] = target.get(labels, 0) + value
    for familyName, samples in (state or {}).items():
        target = values[familyName]
        for labels, value in samples:
            target[labels] = target.get(labels, 0) + value
    return [
        MetricFamily(spec, sorted(values[spec.name].items()))
        for spec in (*counterMap.families, GENERIC)
    ]


def escapeLabelValue(value: str) -> str:
    """A label value as the text format quotes it (backslash, quote, newline escaped)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escapeHelp(text: str) -> str:
    """A HELP text as the text format writes it (backslash and newline escaped)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def formatValue(value: float) -> str:
    """A sample value: integers without a fraction, C{+Inf}, C{-Inf}, C{NaN}."""
    if isinstance(value, int) or (math.isfinite(value) and value == int(value)):
        return str(int(value))
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def render(families: Iterable[MetricFamily]) -> bytes:
    """
    The families in the text exposition format 0.0.4: C{# HELP} and
    C{# TYPE} for every family (also one without samples), then one line
    per sample. UTF-8; undecodable characters as backslash escapes.
    """
    lines: list[str] = []
    for metric in families:
        spec = metric.spec
        lines.append(f"# HELP {spec.name} {escapeHelp(spec.help)}")
        lines.append(f"# TYPE {spec.name} {spec.type}")
        for labels, value in metric.samples:
            if labels:
                text = ",".join(f'{k}="{escapeLabelValue(v)}"' for k, v in labels)
                lines.append(f"{spec.name}{{{text}}} {formatValue(value)}")
            else:
                lines.append(f"{spec.name} {formatValue(value)}")
    return ("\n".join(lines) + "\n").encode("utf-8", "backslashreplace")
