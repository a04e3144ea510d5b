"""
Logs: C{--log-level} filtering, the JSON-lines format, the stable event
fields, and membership churn counted rather than logged at INFO.
"""

# Twisted's assert* methods carry no annotations: calling them is fine here.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import io
from typing import Any, cast

from twisted.internet.interfaces import IReactorCore
from twisted.logger import (
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    LogPublisher,
    eventsFromJSONLogFile,
    globalLogPublisher,
)
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from dmq_bus import tap
from dmq_bus.logs import (
    LOG_LEVELS,
    STABLE_FIELDS,
    LogLevelGate,
    LogLevelService,
    fileObserver,
)
from dmq_bus.service import DMQService
from dmq_bus.testing import MemoryNetwork


@implementer(ILogObserver)
class Collector:
    """An observer keeping every event it sees."""

    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)

    @property
    def levels(self) -> list[LogLevel]:
        return [e["log_level"] for e in self.events]


class RunningReactor:
    """Just enough of a running reactor for L{LogLevelService}."""

    def callWhenRunning(self, f: Any, *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


def emitAll(log: Logger) -> None:
    log.debug("d")
    log.info("i")
    log.warn("w")
    log.error("e")
    log.critical("c")


class LevelTests(SynchronousTestCase):
    """--log-level drops the events below it."""

    def setUp(self) -> None:
        self.publisher = LogPublisher()
        self.seen = Collector()
        self.publisher.addObserver(self.seen)
        self.log = Logger(namespace="dmq_bus.test", observer=self.publisher)

    def test_filtersBelowLevel(self) -> None:
        """At warn, debug and info events no longer reach the observers; the rest do."""
        gate = LogLevelGate(LogLevel.warn, self.publisher)
        gate.install()
        emitAll(self.log)
        self.assertEqual(self.seen.levels, [LogLevel.warn, LogLevel.error, LogLevel.critical])

    def test_everyLevel(self) -> None:
        """Each level name lets through exactly that level and the ones above it."""
        ordered = list(LOG_LEVELS.values())
        for name, level in LOG_LEVELS.items():
            seen = Collector()
            publisher = LogPublisher(seen)
            LogLevelGate(level, publisher).install()
            emitAll(Logger(observer=publisher))
            self.assertEqual(seen.levels, ordered[ordered.index(level) :], name)

    def test_uninstall(self) -> None:
        """After the gate is taken away, every event gets through again."""
        gate = LogLevelGate(LogLevel.error, self.publisher)
        gate.install()
        gate.install()
        gate.uninstall()
        emitAll(self.log)
        self.assertEqual(len(self.seen.events), 5)

    def test_ownerCanRemoveGatedObserver(self) -> None:
        """
        Whoever added an observer can still remove it while gated (trial
        does so after each test): it then receives nothing more.
        """
        LogLevelGate(LogLevel.info, self.publisher).install()
        self.publisher.removeObserver(self.seen)
        emitAll(self.log)
        self.assertEqual(self.seen.events, [])

    def test_serviceInstallsWhileRunning(self) -> None:
        """The level service filters from the moment the reactor runs until it stops."""
        service = LogLevelService(
            LogLevelGate(LogLevel.error, self.publisher), cast(IReactorCore, RunningReactor())
        )
        service.startService()
        self.log.warn("hidden")
        service.stopService()
        self.log.warn("shown")
        self.assertEqual([e["log_format"] for e in self.seen.events], ["shown"])

    def test_option(self) -> None:
        """--log-level takes the five names (any case); anything else is a usage error."""
        options = tap.Options()
        options.parseOptions(["--log-level", "WARN"])
        self.assertEqual(options["logLevel"], LogLevel.warn)
        with self.assertRaises(usage.UsageError) as caught:
            tap.Options().parseOptions(["--log-level", "loud"])
        self.assertIn("--log-level must be one of debug, info, warn, error, critical", str(
            caught.exception
        ))  # fmt: skip

    def test_makeServiceAppliesLevel(self) -> None:
        """makeService gives the node a level service for the global log publisher."""
        options = tap.Options()
        options.parseOptions(["--log-level", "error", "--control", "none"])
        service = tap.makeService(options)
        assert isinstance(service, DMQService)
        (levels,) = [s for s in service if isinstance(s, LogLevelService)]
        self.assertEqual(levels.gate.level, LogLevel.error)
        self.assertIs(levels.gate.publisher, globalLogPublisher)


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class FormatTests(SynchronousTestCase):
    """JSON lines off a terminal, text on one, as `twist` does."""

    def test_jsonWhenNotATerminal(self) -> None:
        """
        Written to a file or pipe, each event is one JSON record (twist's
        --log-format json) keeping the stable fields as they were given.
        """
        stream = io.StringIO()
        log = Logger(namespace="dmq_bus.test", observer=fileObserver(stream))
        log.warn(
            "KDMQ to {node} answered {code}",
            node="sip:127.0.0.1:5061",
            channel="htable",
            call_id="abc@127.0.0.1",
            branch="z9hG4bK1",
            code=408,
        )
        stream.seek(0)
        (event,) = list(eventsFromJSONLogFile(stream))
        self.assertEqual(
            {k: event[k] for k in ("node", "channel", "call_id", "branch", "code")},
            {
                "node": "sip:127.0.0.1:5061",
                "channel": "htable",
                "call_id": "abc@127.0.0.1",
                "branch": "z9hG4bK1",
                "code": 408,
            },
        )
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertTrue(stream.getvalue().startswith("\x1e{"))
        self.assertTrue(set(STABLE_FIELDS) >= {"node", "channel", "call_id", "branch", "code"})

    def test_textOnATerminal(self) -> None:
        """On a terminal the same event is one readable text line."""
        stream = FakeTerminal()
        Logger(namespace="dmq_bus.test", observer=fileObserver(stream)).info(
            "node {node} joined", node="sip:127.0.0.1:5061"
        )
        self.assertRegex(
            stream.getvalue(), r"\[dmq_bus.test#info\] node sip:127.0.0.1:5061 joined\n$"
        )


class ChurnTests(SynchronousTestCase):
    """Membership churn goes to counters; INFO stays quiet."""

    def test_failedNodeCountedNotLoggedAtInfo(self) -> None:
        """
        A node that stops answering is disabled then removed: each step is
        counted, and nothing about it is logged at INFO or above.
        """
        seen = Collector()
        globalLogPublisher.addObserver(seen)
        self.addCleanup(globalLogPublisher.removeObserver, seen)
        network = MemoryNetwork()
        a = network.addNode("127.0.0.1", pingInterval=1.0, pingTimeout=0.5)
        b = network.addNode("127.0.0.2", seeds=[a], pingInterval=1.0, pingTimeout=0.5)
        network.run(1.0)
        self.assertEqual(a.statuses()[b.uri], "active")
        b.crash()
        network.run(5.0)
        self.assertNotIn(b.uri, a.statuses())
        self.assertEqual(
            (
                a.bus.counters["notification.nodes_disabled"],
                a.bus.counters["notification.nodes_removed"],
            ),
            (1, 1),
        )
        loud = [
            e
            for e in seen.events
            if e.get("log_namespace", "").startswith("dmq_bus.bus")
            and e["log_level"] >= LogLevel.info
        ]
        self.assertEqual(loud, [])
        churn = [e for e in seen.events if e.get("node") == b.uri]
        self.assertEqual({e["log_level"] for e in churn}, {LogLevel.debug})
