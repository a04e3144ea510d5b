"""
Logging of a node: the level (C{--log-level}), the format, and the fields
every event may carry.

Events are C{twisted.logger} events. Besides Twisted's own keys
(C{log_level}, C{log_namespace}, C{log_time}, C{log_format}, …) dmq-bus
events use these stable fields, with these meanings, wherever they apply:

  - C{node}: a node's URI as in node lists, C{sip:IP:PORT[;transport=tcp]} (str)
  - C{channel}: a DMQ channel, i.e. the peer a message is for (str)
  - C{call_id}: the Call-ID of the KDMQ request concerned (str)
  - C{branch}: the Via branch of that request, i.e. its transaction (str)
  - C{code}: a SIP status code (int)
  - C{name}: a DNS name being resolved (discovery, str)
  - C{seeds}: how many seeds discovery currently holds (int)
  - C{error}: a short description of what failed (str)

A consumer of JSON logs may rely on these names; their wording in the
message text (C{log_format}) may change. Membership churn (nodes added,
disabled, removed) is counted (C{dmq.stats}), and logged at debug only.

Format: C{twist} already writes JSON lines (C{--log-format json}: each
event is C{\\x1e} + one JSON object + newline) when its log file is not a
terminal, and text otherwise. C{twistd} writes text; C{twistd --logger
dmq_bus.logs.observer} gives it the same rule as C{twist} (on stdout).

Level: C{--log-level} drops every event below it, from every source, at
every observer the runner installed, from the moment the node's services
start (the few lines logged while its sockets open come before). C{twist}
filters at its own C{--log-level} (default info) too, so a level below
info needs both: C{twist --log-level debug dmq --log-level debug}.
"""

from __future__ import annotations

import sys
from typing import IO, Any

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorCore
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    LogPublisher,
    globalLogPublisher,
    jsonFileLogObserver,
    textFileLogObserver,
)
from zope.interface import implementer

LOG_LEVELS: dict[str, LogLevel] = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}
"""The names C{--log-level} takes, lowest first."""

STABLE_FIELDS = ("node", "channel", "call_id", "branch", "code", "name", "seeds", "error")
"""The event fields whose names and meanings stay (see the module docstring)."""


def fileObserver(stream: IO[Any]) -> ILogObserver:
    """
    An observer writing to C{stream} as C{twist} does by default: text when
    C{stream} is a terminal, JSON lines (C{twist --log-format json}) otherwise.
    """
    isatty = getattr(stream, "isatty", None)
    if callable(isatty) and isatty():
        return textFileLogObserver(stream)
    return jsonFileLogObserver(stream)


def observer() -> ILogObserver:
    """
    A log observer factory for C{twistd --logger dmq_bus.logs.observer}:
    L{fileObserver} on standard output.
    """
    return fileObserver(sys.stdout)


@implementer(ILogObserver)
class _Gated:
    """
    An observer of a publisher, behind a level filter. It compares equal to
    the observer it wraps, so that whoever added that observer can still
    remove it with C{removeObserver} (trial does so after each test).
    """

    def __init__(self, observer: ILogObserver, predicate: LogLevelFilterPredicate) -> None:
        self.observer = observer
        self.predicate = predicate
        self._filtered = FilteringLogObserver(observer, [predicate])

    def __call__(self, event: LogEvent) -> None:
        self._filtered(event)

    def __eq__(self, other: object) -> bool:
        return other is self or other is self.observer

    def __hash__(self) -> int:
        return hash(id(self.observer))


class LogLevelGate:
    """
    Drops the events below C{level} before every observer of C{publisher}
    (by default the global one that C{twistd} and C{twist} log to).

    L{install} puts a level filter in front of each observer present at
    that moment; observers added later are not filtered until L{install} is
    called again. L{uninstall} takes the filters away.
    """

    def __init__(self, level: LogLevel, publisher: LogPublisher = globalLogPublisher) -> None:
        self.level = level
        self.publisher = publisher
        self.predicate = LogLevelFilterPredicate(defaultLogLevel=level)

    def install(self) -> None:
        """Filter every observer the publisher has now (again: the ones added since)."""
        observers = self._observers()
        observers[:] = [
            o if isinstance(o, _Gated) else _Gated(o, self.predicate) for o in observers
        ]

    def uninstall(self) -> None:
        """Give the observers still there their events unfiltered again."""
        observers = self._observers()
        observers[:] = [
            o.observer if isinstance(o, _Gated) and o.predicate is self.predicate else o
            for o in observers
        ]

    def _observers(self) -> list[ILogObserver]:
        # LogPublisher offers no way to wrap its observers in place: this
        # is the one reach into its state.
        observers: list[ILogObserver] = self.publisher._observers
        return observers


class LogLevelService(Service):
    """
    Applies a L{LogLevelGate} while it runs: at start, and again once the
    reactor runs. C{twistd} has installed its observer before the services
    start; C{twist} installs its own after (until then the events wait in
    Twisted's start-up buffer, which the gate filters too).
    """

    def __init__(self, gate: LogLevelGate, reactor: IReactorCore) -> None:
        self.gate = gate
        self.reactor = reactor

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.gate.install()
        self.reactor.callWhenRunning(self._install)

    def _install(self) -> None:
        if self.running:
            self.gate.install()

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        self.gate.uninstall()
