"""
dmq-bus node processes for the benchmarks: start many of them on
127.0.0.1, read what each reports about its node list, and make sure none
is left behind.

A node process runs one L{DMQService} (optionally with the echo peer) and
writes one line per event to its report pipe, with a C{time.monotonic()}
stamp (CLOCK_MONOTONIC is one clock for every process on the machine, so
stamps from different processes compare):

    ready <t>                                          listening, join sent
    node <t> <change> <port> <status> <active> <total>  one membership change
    stats <t> <name>=<value> ...                       on SIGUSR1 (L{NodeProcesses.requestStats})
    health <t> <what> <port>                           with C{healthEvents}: a suspicion
                                                       started ("suspect", then "own" or
                                                       "told"), "refuted" or "failed"
    lag <t> <seconds>                                  with C{lagInterval}: the reactor ran a
                                                       timer this late (>= C{LAG_REPORTED})

C{<active>} counts the active nodes the process lists, itself included;
C{<total>} every node it lists. Reading these lines costs nothing on the
nodes' side: no polling of 100 control APIs.

A C{stats} line holds every counter of the node's stack
(L{NodeStack.stats}, the C{health.*} counters included), C{health.covered}
(how many nodes its health monitor covers), C{cpu} (CPU seconds of the
process), C{sched.run} and C{sched.wait} (seconds run, and seconds spent
runnable but waiting for a CPU, from C{/proc/self/schedstat}), C{loss.*}
(datagrams dropped and passed by the C{loss} option) and C{lag.*} (the
C{lagInterval} probe: worst lateness, and how many timers were late by
100 ms and 250 ms or more).

With C{loss} > 0, the node drops each UDP datagram it receives, and each
one it sends, with that probability (C{random.Random(lossSeed)}): loss in
both directions on every link, over real sockets. TCP is left alone.

Processes are made in one of two ways:
  - C{fork} (default): forked from the benchmark process, which imported
    Twisted and dmq_bus once (but installed no reactor); each child then
    installs its own reactor. Start-up is a few milliseconds per node.
  - C{exec}: a fresh interpreter per node (C{python bench/_procs.py
    --node ...}), as C{twistd dmq} would be; ~0.5 s of CPU per node.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import selectors
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Iterable, Iterator, Sequence
from typing import IO, Any

import attrs

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LOOPBACK = "127.0.0.1"


@attrs.frozen
class NodeSpec:
    """One node process: its port, its seeds' ports and its bus settings."""

    port: int
    seeds: tuple[int, ...] = ()
    pingInterval: float = 5.0
    pingTimeout: float = 5.0
    echo: bool = False
    events: bool = True
    loss: float = 0.0
    lossSeed: int = 0
    lagInterval: float = 0.0
    healthEvents: bool = False

    def toJSON(self) -> str:
        return json.dumps(attrs.asdict(self))

    @classmethod
    def fromJSON(cls, text: str) -> NodeSpec:
        values = json.loads(text)
        values["seeds"] = tuple(values["seeds"])
        return cls(**values)


LAG_REPORTED = 0.1
"""Lateness (s) of the C{lagInterval} timer from which a C{lag} line is reported."""


class LossyDatagrams:
    """
    Drops each datagram a node's UDP socket receives, and each one it sends,
    with probability C{loss}. Installed on the node's L{SIPDatagramProtocol}
    before it listens: receiving is its C{datagramReceived}; sending is the
    socket's C{sendto} the protocol finds when it starts, or the port's
    C{write} (both wrapped once the protocol has started).
    """

    def __init__(self, protocol: Any, loss: float, seed: int) -> None:
        self.protocol = protocol
        self.loss = loss
        self.random = random.Random(seed)
        self.counters: dict[str, int] = dict.fromkeys(
            ("loss.dropped_in", "loss.passed_in", "loss.dropped_out", "loss.passed_out"), 0
        )

    def drop(self, direction: str) -> bool:
        """Whether to drop the next datagram going C{direction} ("in"/"out"); counted."""
        dropped = self.random.random() < self.loss
        self.counters[f"loss.{'dropped' if dropped else 'passed'}_{direction}"] += 1
        return dropped

    def install(self) -> None:
        protocol = self.protocol
        receive = protocol.datagramReceived
        start = protocol.startProtocol

        def datagramReceived(datagram: bytes, addr: Any) -> None:
            if not self.drop("in"):
                receive(datagram, addr)

        def startProtocol() -> None:
            start()
            sendto = protocol.sendto
            if sendto is not None:

                def lossySendto(data: bytes, addr: Any) -> int:
                    return len(data) if self.drop("out") else int(sendto(data, addr))

                protocol.sendto = lossySendto
            transport = protocol.transport
            write = transport.write

            def lossyWrite(data: bytes, addr: Any = None) -> Any:
                return None if self.drop("out") else write(data, addr)

            transport.write = lossyWrite

        protocol.datagramReceived = datagramReceived
        protocol.startProtocol = startProtocol


class LagProbe:
    """
    A timer every C{interval} s that measures how late the reactor runs it:
    a process starved of CPU (or blocked) shows here.
    """

    def __init__(self, reactor: Any, interval: float, report: Any) -> None:
        self.reactor = reactor
        self.interval = interval
        self.report = report
        self.counters: dict[str, float] = {"lag.max": 0.0, "lag.over_100ms": 0, "lag.over_250ms": 0}
        self._due = 0.0

    def start(self) -> None:
        self._due = time.monotonic() + self.interval
        self.reactor.callLater(self.interval, self._tick)

    def _tick(self) -> None:
        now = time.monotonic()
        lag = now - self._due
        counters = self.counters
        counters["lag.max"] = max(counters["lag.max"], lag)
        if lag >= 0.1:
            counters["lag.over_100ms"] += 1
        if lag >= 0.25:
            counters["lag.over_250ms"] += 1
        if lag >= LAG_REPORTED:
            self.report(f"lag {now:.6f} {lag:.3f}\n")
        self._due = now + self.interval
        self.reactor.callLater(self.interval, self._tick)


def _schedstat() -> dict[str, float]:
    """Seconds this process ran, and waited runnable for a CPU (Linux schedstat)."""
    try:
        with open("/proc/self/schedstat") as f:
            run, wait = (int(x) for x in f.read().split()[:2])
    except (OSError, ValueError):
        return {}
    return {"sched.run": run / 1e9, "sched.wait": wait / 1e9}


def _reportHealth(health: Any, report: Any) -> None:
    """Report the suspicions of a L{HealthMonitor}: started, refuted, failed."""
    suspect = health.suspect
    heardFrom = health._heardFrom
    onFailed = health.onFailed

    def line(what: str, node: Any) -> None:
        report(f"health {time.monotonic():.6f} {what} {node.uri.port}\n")

    def suspecting(node: Any, *, announce: bool) -> None:
        before = health.suspected(node.key)
        suspect(node, announce=announce)
        if not before and health.suspected(node.key):
            line("suspect-own" if announce else "suspect-told", node)

    def heard(key: Any) -> None:
        before = health.suspected(key)
        heardFrom(key)
        node = health.nodeList.get(key)
        if before and not health.suspected(key) and node is not None:
            line("refuted", node)

    def failed(node: Any) -> None:
        line("failed", node)
        onFailed(node)

    health.suspect = suspecting
    health._heardFrom = heard
    health.onFailed = failed


def parseStats(fields: Sequence[str]) -> dict[str, float]:
    """The values of a C{stats} report's fields (C{name=value} each)."""
    values: dict[str, float] = {}
    for field in fields:
        name, _, value = field.partition("=")
        values[name] = float(value)
    return values


def runNode(spec: NodeSpec, reportFD: int) -> None:
    """
    Run one node on the global reactor until SIGTERM (graceful leave) or
    SIGKILL, reporting to C{reportFD}. Installs the reactor: call it only in
    a process that has none yet.
    """
    from twisted.internet import reactor

    from dmq_bus.bus.dispatch import BusConfig
    from dmq_bus.bus.values import MembershipEvent, NodeStatus
    from dmq_bus.peers.echo import EchoPeer
    from dmq_bus.service import DMQService, NodeConfig
    from dmq_bus.sip.uri import SIPURI

    config = BusConfig(
        serverAddress=SIPURI.parse(f"sip:{LOOPBACK}:{spec.port}"),
        notificationAddresses=tuple(SIPURI.parse(f"sip:{LOOPBACK}:{p}") for p in spec.seeds),
        pingInterval=spec.pingInterval,
        pingTimeout=spec.pingTimeout,
    )
    service = DMQService(NodeConfig(bus=config), reactor)
    if spec.echo:
        service.bus.registerPeer(EchoPeer())
    nodeList = service.bus.nodeList

    def report(line: str) -> None:
        with contextlib.suppress(OSError):
            os.write(reportFD, line.encode())

    def observe(event: MembershipEvent) -> None:
        node = event.node
        active = nodeList.count(NodeStatus.ACTIVE) + 1
        report(
            f"node {time.monotonic():.6f} {event.change.value} {node.uri.port} "
            f"{node.status.word} {active} {len(nodeList)}\n"
        )

    if spec.events:
        service.bus.addMembershipObserver(observe)
    health = service.stack.notification.health
    if spec.healthEvents:
        _reportHealth(health, report)
    lossy = None
    if spec.loss > 0:
        lossy = LossyDatagrams(service.stack.transport.datagramProtocol(), spec.loss, spec.lossSeed)
        lossy.install()
    lagProbe = LagProbe(reactor, spec.lagInterval, report) if spec.lagInterval > 0 else None

    def stats() -> None:
        values: dict[str, float] = dict(service.stack.stats())
        values["health.covered"] = len(health.covered())
        values["cpu"] = time.process_time()
        values |= _schedstat()
        if lossy is not None:
            values |= lossy.counters
        if lagProbe is not None:
            values |= lagProbe.counters
        fields = " ".join(
            f"{name}={value if isinstance(value, int) else f'{value:.6f}'}"
            for name, value in values.items()
        )
        report(f"stats {time.monotonic():.6f} {fields}\n")

    signal.signal(signal.SIGUSR1, lambda *_: reactor.callFromThread(stats))  # type: ignore[attr-defined]
    service.startService()
    if lagProbe is not None:
        lagProbe.start()
    report(f"ready {time.monotonic():.6f}\n")
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


@attrs.define
class NodeProcess:
    """A started node process and what it has reported so far."""

    spec: NodeSpec
    pid: int
    reportFD: int
    spawned: float
    popen: subprocess.Popen[bytes] | None = None
    ready: float | None = None
    buffer: bytes = b""
    exited: bool = False

    def lines(self, data: bytes) -> list[str]:
        """Split newly read C{data} into complete lines."""
        self.buffer += data
        *complete, self.buffer = self.buffer.split(b"\n")
        return [line.decode() for line in complete]


@attrs.frozen
class Report:
    """One line from a node process."""

    process: NodeProcess
    kind: str
    time: float
    fields: tuple[str, ...]


class NodeProcesses:
    """
    Node processes started here, and the one place that stops them: use it
    as a context manager, so they are stopped (and reaped) on any exit.
    """

    def __init__(self, spawn: str = "fork") -> None:
        if spawn not in ("fork", "exec"):
            raise ValueError(f"spawn must be 'fork' or 'exec', not {spawn!r}")
        self.spawn = spawn
        self.processes: list[NodeProcess] = []
        self._selector = selectors.DefaultSelector()

    def __enter__(self) -> NodeProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopAll()

    def start(self, spec: NodeSpec) -> NodeProcess:
        """Start one node process (it reports C{ready} soon after)."""
        spawned = time.monotonic()
        if self.spawn == "fork":
            process = self._fork(spec, spawned)
        else:
            process = self._exec(spec, spawned)
        self.processes.append(process)
        os.set_blocking(process.reportFD, False)
        self._selector.register(process.reportFD, selectors.EVENT_READ, process)
        return process

    def _fork(self, spec: NodeSpec, spawned: float) -> NodeProcess:
        readFD, writeFD = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the node
            code = 0
            try:
                os.close(readFD)
                for other in self.processes:
                    with contextlib.suppress(OSError):
                        os.close(other.reportFD)
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                devnull = os.open(os.devnull, os.O_RDWR)
                os.dup2(devnull, 0)
                os.dup2(devnull, 1)
                runNode(spec, writeFD)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        os.close(writeFD)
        return NodeProcess(spec, pid, readFD, spawned)

    def _exec(self, spec: NodeSpec, spawned: float) -> NodeProcess:
        popen = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--node", spec.toJSON()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        assert popen.stdout is not None
        return NodeProcess(spec, popen.pid, popen.stdout.fileno(), spawned, popen=popen)

    def read(self, timeout: float) -> list[Report]:
        """Every report that arrives within C{timeout} s (returns at the first batch)."""
        reports: list[Report] = []
        for key, _ in self._selector.select(timeout):
            process: NodeProcess = key.data
            try:
                data = os.read(process.reportFD, 65536)
            except BlockingIOError:
                continue
            if not data:
                self._selector.unregister(process.reportFD)
                process.exited = True
                continue
            for line in process.lines(data):
                kind, stamp, *fields = line.split()
                report = Report(process, kind, float(stamp), tuple(fields))
                if kind == "ready":
                    process.ready = report.time
                reports.append(report)
        return reports

    def readUntil(self, done: Any, timeout: float) -> Iterator[Report]:
        """Yield reports until C{done()} is true or C{timeout} s passed."""
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            yield from self.read(min(left, 0.2))

    def requestStats(self, process: NodeProcess) -> bool:
        """
        Ask a node for a C{stats} report (SIGUSR1); whether it was asked
        (not before it is ready, when SIGUSR1 would still kill it, nor once
        it is gone).
        """
        if process.ready is None or process.exited:
            return False
        try:
            os.kill(process.pid, signal.SIGUSR1)
        except ProcessLookupError:
            return False
        return True

    def kill(self, process: NodeProcess) -> float:
        """SIGKILL one node; the monotonic time just before the signal."""
        when = time.monotonic()
        os.kill(process.pid, signal.SIGKILL)
        return when

    def stopAll(self, grace: float = 5.0) -> None:
        """
        SIGTERM every node (each announces its leave, bounded by its leave
        timeout), SIGKILL whatever is left after C{grace} s, reap them all,
        and check that none is left.
        """
        alive = [p for p in self.processes if self._alive(p)]
        for process in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while alive and time.monotonic() < deadline:
            alive = [p for p in alive if self._alive(p)]
            if alive:
                time.sleep(0.05)
        for process in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
        for process in self.processes:
            self._reap(process)
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(process.reportFD)
            with contextlib.suppress(OSError):
                if process.popen is not None and process.popen.stdout is not None:
                    process.popen.stdout.close()
                else:
                    os.close(process.reportFD)
        left = [p.pid for p in self.processes if _exists(p.pid)]
        self.processes = []
        if left:
            raise RuntimeError(f"node processes survived SIGKILL: {left}")

    def _alive(self, process: NodeProcess) -> bool:
        return self._poll(process) is None

    def _poll(self, process: NodeProcess) -> int | None:
        if process.popen is not None:
            return process.popen.poll()
        try:
            pid, status = os.waitpid(process.pid, os.WNOHANG)
        except ChildProcessError:
            return 0
        if pid == 0:
            return None
        process.popen = None
        process.exited = True
        return status

    def _reap(self, process: NodeProcess) -> None:
        if process.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.popen.wait(5)
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(process.pid, 0)


def _exists(pid: int) -> bool:
    """Whether a process with C{pid} exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] not in ("Z", "X")


def percentile(sortedValues: Sequence[float], fraction: float) -> float:
    """The C{fraction} quantile (nearest rank) of already sorted values."""
    if not sortedValues:
        return float("nan")
    rank = max(0, min(len(sortedValues) - 1, int(fraction * len(sortedValues) + 0.999999) - 1))
    return sortedValues[rank]


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """An aligned text table: the first column left-aligned, the others right."""
    cells = [list(header)] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = []
    for index, row in enumerate(cells):
        parts = [
            row[i].ljust(widths[i]) if i == 0 else row[i].rjust(widths[i]) for i in range(len(row))
        ]
        lines.append("  ".join(parts).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def rssMB(pid: int) -> float:
    """Resident memory of a process in MB (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            pages = int(f.read().split()[1])
    except OSError:
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6


def _main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="one dmq-bus node process (for the benchmarks)")
    parser.add_argument("--node", required=True, help="a NodeSpec as JSON")
    args = parser.parse_args(argv)
    runNode(NodeSpec.fromJSON(args.node), sys.stdout.fileno())


def writeLine(stream: IO[str], text: str) -> None:
    """Write and flush a line (progress messages while a benchmark runs)."""
    stream.write(text + "\n")
    stream.flush()


if __name__ == "__main__":
    _main(sys.argv[1:])
