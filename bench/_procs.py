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

C{<active>} counts the active nodes the process lists, itself included;
C{<total>} every node it lists. Reading these lines costs nothing on the
nodes' side: no polling of 100 control APIs.

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

    def toJSON(self) -> str:
        return json.dumps(attrs.asdict(self))

    @classmethod
    def fromJSON(cls, text: str) -> NodeSpec:
        values = json.loads(text)
        values["seeds"] = tuple(values["seeds"])
        return cls(**values)


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
    service.startService()
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
