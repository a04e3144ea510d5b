"""
C{GET /metrics}: the node's counters and state in the Prometheus text
format 0.0.4, read back by the real Prometheus parser (prometheus_client)
after real traffic on an in-memory bus; the mapping table itself; and the
writer's escaping.
"""

# Twisted's assert* methods carry no annotations: calling them is fine here.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from dmq_bus import __version__, metrics
from dmq_bus.bus import guard
from dmq_bus.bus.guard import AccessPolicy
from dmq_bus.bus.values import NodeStatus
from dmq_bus.control import ControlAPI, MetricsResource
from dmq_bus.metrics import (
    COUNTER,
    FAMILIES,
    GAUGE,
    GENERIC,
    CounterMap,
    FamilySpec,
    MetricFamily,
    collect,
    exact,
    matching,
    render,
)
from dmq_bus.peers.echo import EchoPeer
from dmq_bus.sip import transport
from dmq_bus.testing import MemoryNetwork

from .test_control import MemoryHashTable, MemoryHashTables

Parsed = dict[str, dict[tuple[tuple[str, str], ...], float]]


def parse(text: bytes) -> tuple[dict[str, Any], Parsed]:
    """
    The output read by prometheus_client's parser: the families by their
    exposed name (a counter's C{_total} included), and every sample's value
    by sample name and sorted labels.
    """
    families: dict[str, Any] = {}
    samples: Parsed = {}
    for family in text_string_to_metric_families(text.decode("utf-8")):
        name = family.name + ("_total" if family.type == "counter" else "")
        families[name] = family
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return families, samples


class TrafficTests(SynchronousTestCase):
    """
    A 2-node bus carrying echo messages, one garbage datagram and one
    message to a node that died: every expected family, label and value is
    there, read with the real Prometheus parser.
    """

    def setUp(self) -> None:
        self.network = MemoryNetwork()
        self.a = self.network.addNode("127.0.0.1", 27132, pingInterval=1.0, pingTimeout=1.0)
        self.b = self.network.addNode(
            "127.0.0.1", 27133, seeds=[self.a], pingInterval=1.0, pingTimeout=1.0
        )
        for node in (self.a, self.b):
            node.registerPeer(EchoPeer())
        self.network.run(3.0)
        self.kv = MemoryHashTable("kv", self.network.clock)
        self.api = ControlAPI(self.a.bus, MemoryHashTables(self.kv), self.a.stack.stats)

    def scrape(self) -> tuple[dict[str, Any], Parsed]:
        """What GET /metrics on node a answers, parsed."""
        request = DummyRequest([b"metrics"])
        body = MetricsResource(self.api).render_GET(request)  # type: ignore[arg-type]
        self.assertEqual(
            request.responseHeaders.getRawHeaders(b"content-type"),
            [b"text/plain; version=0.0.4; charset=utf-8"],
        )
        return parse(body)

    def echo(self, count: int) -> None:
        for _ in range(count):
            self.a.bus.broadcast("echo", b"hi", "text/plain")
        self.network.run(0.1)

    def test_everyFamilyParses(self) -> None:
        """Every family of the table is in the output with its type, once; the parser agrees."""
        families, _ = self.scrape()
        expected = {spec.name: spec.type for spec in (*FAMILIES, GENERIC)}
        self.assertEqual({name: f.type for name, f in families.items()}, expected)
        for spec in FAMILIES:
            self.assertEqual(families[spec.name].documentation, spec.help)

    def test_messagesPerChannelAndCode(self) -> None:
        """Messages sent, received and answered show per channel and per status code."""
        self.echo(3)
        _, samples = self.scrape()
        self.assertEqual(samples["dmq_messages_sent_total"][(("channel", "echo"),)], 3)
        self.assertEqual(
            samples["dmq_responses_received_total"][(("channel", "echo"), ("code", "200"))], 3
        )
        self.assertGreater(
            samples["dmq_messages_received_total"][(("channel", "notification_peer"),)], 0
        )
        self.assertEqual(
            samples["dmq_sip_messages_sent_total"][(("transport", "udp"),)],
            self.a.stack.stats()["udp.sent"],
        )

    def test_nothingFallsToGeneric(self) -> None:
        """After ordinary traffic every counter of every layer has its own family."""
        self.echo(2)
        _, samples = self.scrape()
        self.assertNotIn("dmq_counter_total", samples)
        counterMap = CounterMap()
        for name in self.a.stack.stats():
            self.assertIsNot(counterMap.classify(name)[0], GENERIC, name)

    def test_unknownCounterNotHidden(self) -> None:
        """A counter no row maps is exported under dmq_counter_total with its name."""
        self.a.bus.counters['new.thing"odd'] += 4
        _, samples = self.scrape()
        self.assertEqual(samples["dmq_counter_total"][(("name", 'new.thing"odd'),)], 4)

    def test_parseErrorsPerTransport(self) -> None:
        """A datagram that is no SIP message counts as a UDP parse error."""
        self.network.deliver(("127.0.0.9", 5060), self.a.endpoint, b"\x00\x01 not SIP\r\n\r\n")
        self.network.run(0.1)
        _, samples = self.scrape()
        errors = samples["dmq_sip_parse_errors_total"]
        self.assertEqual(errors[(("transport", "udp"),)], 1)
        self.assertEqual(errors[(("transport", "tcp"),)], 0)

    def test_retransmissionsAndTimeouts(self) -> None:
        """A message to a node that died is retransmitted, times out and fails with 408."""
        other = self.a.bus.nodes()[0]
        self.b.crash()
        self.a.bus.send("echo", other, b"hi", "text/plain").addErrback(lambda _: None)
        self.network.run(40.0)
        _, samples = self.scrape()
        self.assertGreaterEqual(samples["dmq_sip_retransmissions_total"][()], 10)
        self.assertGreaterEqual(
            samples["dmq_sip_transaction_timeouts_total"][(("side", "client"),)], 1
        )
        self.assertEqual(
            samples["dmq_send_failures_total"][(("channel", "echo"), ("code", "408"))], 1
        )

    def test_nodesAndMembership(self) -> None:
        """Nodes per status (a gauge, every status) and membership changes per kind."""
        _, before = self.scrape()
        self.assertEqual(
            before["dmq_nodes"],
            {(("status", s.word),): 2 if s is NodeStatus.ACTIVE else 0 for s in NodeStatus},
        )
        self.b.crash()
        self.network.run(10.0)
        _, after = self.scrape()
        self.assertEqual(after["dmq_nodes"][(("status", "active"),)], 1)
        changes = after["dmq_membership_changes_total"]
        self.assertEqual(changes[(("change", "added"),)], 1)
        self.assertEqual(changes[(("change", "status"),)], 1)
        self.assertEqual(changes[(("change", "removed"),)], 1)
        self.assertEqual(after["dmq_node_list_size"][()], 1)

    def test_stateGauges(self) -> None:
        """Cells per table, open and completed transactions, the node's identity."""
        self.kv.set("a", "1")
        self.kv.set("b", 2)
        self.a.bus.broadcast("echo", b"hi", "text/plain")
        _, samples = self.scrape()
        self.assertEqual(samples["dmq_htable_cells"], {(("table", "kv"),): 2})
        transactions = self.a.stack.transactions
        self.assertGreaterEqual(transactions.openClientTransactions, 1)
        self.assertEqual(
            samples["dmq_sip_transactions_open"][(("side", "client"),)],
            transactions.openClientTransactions,
        )
        self.assertIn((("side", "server"),), samples["dmq_sip_transactions_completed"])
        self.assertEqual(
            samples["dmq_node_info"],
            {(("uri", "sip:127.0.0.1:27132"), ("version", __version__)): 1},
        )

    def test_eventStreamFamilies(self) -> None:
        """The /events stream's clients, backlog and counters are exported too."""
        _, samples = self.scrape()
        self.assertEqual(samples["dmq_events_clients"][()], 0)
        self.assertEqual(samples["dmq_events_backlog"][()], 0)
        self.assertEqual(samples["dmq_events_clients_total"][(("outcome", "dropped_slow"),)], 0)


class TableTests(SynchronousTestCase):
    """The mapping table is well formed and says what each counter becomes."""

    def test_namesAndTypes(self) -> None:
        """Every family is dmq_-prefixed; counters, and only counters, end in _total."""
        for spec in (*FAMILIES, GENERIC):
            self.assertTrue(spec.name.startswith("dmq_"))
            self.assertEqual(spec.type == COUNTER, spec.name.endswith("_total"), spec.name)
            self.assertTrue(spec.help)

    def test_badRowsRefused(self) -> None:
        """A row with a bad name, type, suffix or label is refused when the table is built."""
        with self.assertRaises(ValueError):
            FamilySpec("other_total", COUNTER, "x")
        with self.assertRaises(ValueError):
            FamilySpec("dmq_x", COUNTER, "x")
        with self.assertRaises(ValueError):
            FamilySpec("dmq_x_total", GAUGE, "x")
        with self.assertRaises(ValueError):
            FamilySpec("dmq_x_total", COUNTER, "x", (exact("a", **{"bad-label": "v"}),))
        with self.assertRaises(ValueError):
            CounterMap([FamilySpec("dmq_a_total", COUNTER, "a", (exact("a"), exact("a")))])

    def test_examples(self) -> None:
        """The layers' flat names map to families and labels as documented."""
        counterMap = CounterMap()
        for name, family, labels in [
            ("in.requests.htable", "dmq_messages_received_total", (("channel", "htable"),)),
            (
                "out.responses.my.chan.404",
                "dmq_responses_received_total",
                (("channel", "my.chan"), ("code", "404")),
            ),
            ("client.retransmissions", "dmq_sip_retransmissions_total", ()),
            ("client.timeouts", "dmq_sip_transaction_timeouts_total", (("side", "client"),)),
            ("tcp.parse_errors", "dmq_sip_parse_errors_total", (("transport", "tcp"),)),
            ("membership.removed", "dmq_membership_changes_total", (("change", "removed"),)),
            ("transactions.server_open", "dmq_sip_transactions_open", (("side", "server"),)),
            ("htable.sync.cells_skipped", "dmq_htable_sync_cells_total", (("result", "skipped"),)),
            ("in.forbidden.not_tls", "dmq_requests_forbidden_total", (("reason", "not_tls"),)),
            ("in.forbidden.later", "dmq_requests_forbidden_total", (("reason", "later"),)),
            (
                "tls.refused_by_peer",
                "dmq_sip_tls_failures_total",
                (("reason", "refused_by_peer"),),
            ),
            ("no.such", "dmq_counter_total", (("name", "no.such"),)),
        ]:
            spec, got = counterMap.classify(name)
            self.assertEqual((spec.name, got), (family, labels), name)

    def test_exactCountersStartAtZero(self) -> None:
        """Exactly named counters show 0 before they count; gauges and patterns do not show."""
        _, samples = parse(render(collect({})))
        self.assertEqual(samples["dmq_sip_retransmissions_total"], {(): 0})
        self.assertNotIn("dmq_sip_udp_receive_buffer_bytes", samples)
        self.assertNotIn("dmq_messages_received_total", samples)

    def test_sameLabelsAdd(self) -> None:
        """Two counters that land on one family and label set are added up."""
        spec = FamilySpec(
            "dmq_t_total", COUNTER, "t", (exact("a", k="v"), matching(r"b\.(?P<k>.+)"))
        )
        families = collect({"a": 2, "b.v": 3, "b.w": 1}, counterMap=CounterMap([spec]))
        self.assertEqual(families[0].samples, [((("k", "v"),), 5), ((("k", "w"),), 1)])

    def test_stateForUnknownFamily(self) -> None:
        """State for a family that is not in the table is a programming error."""
        with self.assertRaises(KeyError):
            collect({}, {"dmq_nope": [((), 1)]})


class WriterTests(SynchronousTestCase):
    """L{render} writes what the real parser reads back exactly."""

    def test_escaping(self) -> None:
        """Backslashes, quotes, newlines and non-ASCII in labels and help survive a round trip."""
        spec = FamilySpec("dmq_odd_total", COUNTER, 'help with \\ and\nnewline "q"')
        value = 'a\\b"c\nd é ✓'
        text = render([MetricFamily(spec, [((("name", value),), 7)])])
        families, samples = parse(text)
        self.assertEqual(families["dmq_odd_total"].documentation, spec.help)
        self.assertEqual(samples["dmq_odd_total"], {(("name", value),): 7})

    def test_undecodableLabel(self) -> None:
        """A label holding undecodable bytes (surrogateescape) still gives valid UTF-8."""
        spec = FamilySpec("dmq_odd_total", COUNTER, "x")
        text = render([MetricFamily(spec, [((("name", "a\udcff"),), 1)])])
        _, samples = parse(text)
        self.assertEqual(list(samples["dmq_odd_total"].values()), [1])

    def test_values(self) -> None:
        """Integers print without a fraction; fractions, infinities and NaN as Prometheus writes them."""
        self.assertEqual(
            [metrics.formatValue(v) for v in (3, 2.0, 0.25, float("inf"), float("-inf"))],
            ["3", "2", "0.25", "+Inf", "-Inf"],
        )
        self.assertEqual(metrics.formatValue(float("nan")), "NaN")

    def test_emptyFamily(self) -> None:
        """A family without samples still has its HELP and TYPE lines."""
        text = render([MetricFamily(FamilySpec("dmq_none", GAUGE, "nothing yet"))])
        self.assertEqual(text, b"# HELP dmq_none nothing yet\n# TYPE dmq_none gauge\n")
        families, _ = parse(text)
        self.assertEqual(families["dmq_none"].samples, [])


class HealthFamilyTests(SynchronousTestCase):
    """Failure-detection counters are exported under their own family."""

    def test_healthEvents(self) -> None:
        """health.* counters become dmq_health_events_total{event=...}."""
        from dmq_bus import metrics

        families = {f.spec.name: f for f in metrics.collect({"health.probes": 7})}
        self.assertEqual(families["dmq_health_events_total"].samples, [((("event", "probes"),), 7)])


class AccessAndTLSFamilyTests(SynchronousTestCase):
    """
    Membership-control refusals and TLS failures have their own families,
    every reason exported from the start at 0.
    """

    def test_everyRefusalHasItsReason(self) -> None:
        """Every 403 reason of the guard is an exact row of dmq_requests_forbidden_total."""
        refusals = [v for v in vars(guard).values() if isinstance(v, guard.Refusal)]
        forbidden = [r for r in refusals if r.code == 403]
        self.assertIn(guard.FORBIDDEN_NOT_TLS, forbidden)
        exactNames = CounterMap().exactNames()
        for refusal in forbidden:
            spec, labels = exactNames[refusal.counter]
            reason = refusal.counter.removeprefix("in.forbidden.")
            self.assertEqual(
                (spec.name, labels), ("dmq_requests_forbidden_total", (("reason", reason),))
            )

    def test_everyTLSCounterHasAFamily(self) -> None:
        """Every tls.* counter the transport counts is an exact row of dmq_sip_tls_failures_total."""
        source = Path(transport.__file__).read_text(encoding="utf-8")
        names = set(re.findall(r'counters\["(tls\.[a-z_]+)"\]', source))
        self.assertEqual(
            names, {"tls.handshake_failed", "tls.refused_by_peer", "tls.inbound_failed"}
        )
        exactNames = CounterMap().exactNames()
        for name in names:
            spec, labels = exactNames[name]
            self.assertEqual(
                (spec.name, labels),
                ("dmq_sip_tls_failures_total", (("reason", name.removeprefix("tls.")),)),
            )

    def test_zeroFromTheStart(self) -> None:
        """Before anything is refused or fails, every reason shows 0."""
        _, samples = parse(render(collect({})))
        self.assertEqual(
            samples["dmq_sip_tls_failures_total"],
            {
                (("reason", r),): 0
                for r in ("handshake_failed", "refused_by_peer", "inbound_failed")
            },
        )
        self.assertEqual(samples["dmq_requests_forbidden_total"][(("reason", "not_tls"),)], 0)
        self.assertEqual(len(samples["dmq_requests_forbidden_total"]), 7)

    def test_notTLSRefusalScraped(self) -> None:
        """
        A TLS-only node refuses a message that arrives over (in-memory)
        UDP: /metrics shows it as dmq_requests_forbidden_total{reason="not_tls"}.
        """
        network = MemoryNetwork()
        only = network.addNode("127.0.0.1", start=False, access=AccessPolicy(tlsOnly=True))
        sender = network.addNode("127.0.0.2", start=False)
        d = sender.bus.send("echo", only.bus.localNode, b"x", "text/plain")
        network.run(0.1)
        self.assertEqual(self.successResultOf(d).code, 403)
        api = ControlAPI(only.bus, None, only.stack.stats)
        request = DummyRequest([b"metrics"])
        _, samples = parse(MetricsResource(api).render_GET(request))  # type: ignore[arg-type]
        forbidden = samples["dmq_requests_forbidden_total"]
        self.assertEqual(forbidden[(("reason", "not_tls"),)], 1)
        self.assertEqual(forbidden[(("reason", "network"),)], 0)
        self.assertNotIn("dmq_counter_total", samples)


OPERATING = Path(__file__).parent.parent / "docs" / "operating.md"


def familyLabels(spec: FamilySpec) -> list[str]:
    """The label names of a family's counter sources, in order of appearance."""
    names: list[str] = []
    for source in spec.sources:
        for name in [n for n, _ in source.labels] + list(
            source.pattern.groupindex if source.regex else ()
        ):
            if name not in names:
                names.append(name)
    return names


class DocumentationTableTests(SynchronousTestCase):
    """The table of families in docs/operating.md says what FAMILIES says."""

    def test_tableMatchesFamilies(self) -> None:
        """
        One row per family, in table order, then dmq_counter_total: name,
        type, help text, and (for families made of counters) the labels.
        """
        text = OPERATING.read_text(encoding="utf-8")
        start = text.index("Every family (generated from `dmq_bus.metrics.FAMILIES`):")
        rows = []
        for line in text[start:].splitlines()[4:]:
            if not line.startswith("| `dmq_"):
                break
            rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
        specs = (*FAMILIES, GENERIC)
        self.assertEqual([r[0] for r in rows], [f"`{spec.name}`" for spec in specs])
        for (name, kind, labels, meaning), spec in zip(rows, specs):
            self.assertEqual((kind, meaning), (spec.type, spec.help), name)
            if spec.sources:
                self.assertEqual(
                    labels, ", ".join(f"`{label}`" for label in familyLabels(spec)), name
                )
