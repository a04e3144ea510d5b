"""
Shared pieces of the benchmark scripts: dmq-bus node processes driven over
a pipe, real Kamailio nodes driven over their JSON-RPC datagram socket, and
readings from /proc (CPU seconds, RSS/PSS, UDP receive-buffer drops).

A dmq-bus benchmark node is this file run as a program
(C{python bench/common.py node --port PORT ...}): one L{DMQService} with the
htable peer holding table C{kv}, on 127.0.0.1 (C{--host IP} for another
address, C{--seed-host IP} for the seed's when it differs). It reads one command a line
on stdin and answers on stdout (times are C{time.monotonic()}, which is the
same clock in every process of the machine)::

    ready T                      (printed once listening; T = startService)
    active                  ->   active COUNT          (active other nodes)
    fill PREFIX N           ->   filled N SECONDS      (N local sets, batches of 10,000)
    write PREFIX N BATCH WINDOW
                            ->   written T0 T1 REJECTED
        N sets PREFIX<i> = v<i> from inside the process: BATCH sets per
        reactor turn (answers are read between turns); a turn is put off
        while more than WINDOW client transactions are open.
    watch N                 ->   reached N T           (when the table holds N keys;
                                                        looked at every 2 ms)
    count                   ->   count N
    set KEY VALUE           ->   stored KEY            (one local set; VALUE a string)
    get KEY                 ->   value JSON            (the value, null when absent)
    nodes                   ->   nodes JSON            (the whole node list, this node
                                                        included: [{"uri","status","local"}])
    profile-restart         ->   profiling 0|1         (with --profile: start afresh)
    stats                   ->   stats {JSON}          (every counter of the node)
    quit                    ->   (leaves the bus, exits)

C{--watch N} on the command line sets the watch before the node starts
(a joiner that times its own sync); C{--profile FILE} writes a cProfile
of the node's whole life to FILE when it quits.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests.interop.kamailio import (  # noqa: E402
    KamailioNode,
    allocatePorts,
    kamailioAvailable,
    releasePorts,
)

__all__ = [
    "BenchError",
    "BusNode",
    "KamailioRPC",
    "allocatePorts",
    "cpuSeconds",
    "formatTable",
    "kamailioAvailable",
    "kamailioGroupPids",
    "median",
    "memory",
    "releasePorts",
    "sipBulk",
    "udpRcvbufErrors",
    "waitFor",
]

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
"""Ticks per second of the utime/stime fields of /proc/PID/stat."""

NODE_START_TIMEOUT = 15.0
"""Seconds a dmq-bus node process may take to print C{ready}."""

NODE_STOP_TIMEOUT = 10.0
"""Seconds a dmq-bus node process may take to exit after C{quit}."""


WATCH_INTERVAL = 0.002
"""Seconds between two looks of a node process at its table size (C{watch})."""

JSON_ANSWERS = frozenset({"stats", "nodes", "value"})
"""Answers whose rest of line is one JSON text (L{BusNode.expect} does not split it)."""


class BenchError(Exception):
    """A benchmark step failed or did not finish in time (the message says which)."""


# ---------------------------------------------------------------------------
# /proc readings


def cpuSeconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds of the processes C{pids} (gone ones count 0)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def memory(pids: Iterable[int]) -> tuple[int, int]:
    """C{(RSS, PSS)} in bytes, summed over C{pids}, from /proc/PID/smaps_rollup."""
    rss = pss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    name, _, rest = line.partition(":")
                    if name == "Rss":
                        rss += int(rest.split()[0]) * 1024
                    elif name == "Pss":
                        pss += int(rest.split()[0]) * 1024
        except OSError:
            continue
    return rss, pss


def udpRcvbufErrors() -> int:
    """The machine's UDP C{RcvbufErrors} counter (datagrams dropped, full receive buffer)."""
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Udp:")]
    values = dict(zip(rows[0][1:], rows[1][1:]))
    return int(values.get("RcvbufErrors", 0))


def median(values: Sequence[float]) -> float:
    """The median, NaN for no values."""
    return statistics.median(values) if values else float("nan")


def formatTable(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """An aligned text table: the first column left-aligned, the others right-aligned."""
    text = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in text) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        cells = [
            row[i].ljust(widths[i]) if i == 0 else row[i].rjust(widths[i]) for i in range(len(row))
        ]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(text[0]), rule, *(line(r) for r in text[1:])])


def waitFor(predicate: Any, timeout: float, what: str, interval: float = 0.005) -> float:
    """
    Poll C{predicate()} every C{interval} s until it is true; the
    C{time.monotonic()} at which it was seen true.

    @raise BenchError: still false after C{timeout} s (naming C{what}).
    """
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------------------
# dmq-bus node processes (the parent side)


class BusNode:
    """
    One dmq-bus node process on C{host}:C{port} (127.0.0.1 by default), with
    table C{kv}, driven over its stdin/stdout (see the module docstring).
    C{seedHost} is the seed's address (C{host} when None); C{prefix} goes
    before the command (C{["ip", "netns", "exec", NS]} to run it in a
    network namespace). Use as a context manager or call L{stop}; L{stop}
    is always safe.
    """

    def __init__(
        self,
        port: int,
        seedPort: int | None = None,
        *,
        logDir: str,
        watch: int | None = None,
        countBytes: bool = False,
        profile: str | None = None,
        host: str = "127.0.0.1",
        seedHost: str | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        self.port = port
        self.seedPort = seedPort
        self.host = host
        self.name = str(port) if host == "127.0.0.1" else f"{host}:{port}"
        logName = f"dmq-{port}.log" if host == "127.0.0.1" else f"dmq-{host}-{port}.log"
        self.logPath = os.path.join(logDir, logName)
        self.command = [*prefix, sys.executable, os.path.abspath(__file__), "node"]
        self.command += ["--port", str(port)]
        if host != "127.0.0.1":
            self.command += ["--host", host]
        if seedPort is not None:
            self.command += ["--seed", str(seedPort)]
            if seedHost is not None and seedHost != host:
                self.command += ["--seed-host", seedHost]
        if watch is not None:
            self.command += ["--watch", str(watch)]
        if countBytes:
            self.command += ["--count-bytes"]
        if profile is not None:
            self.command += ["--profile", profile]
        self.process: subprocess.Popen[bytes] | None = None
        self.spawnedAt = 0.0
        self.startedAt = 0.0
        self._buffer = b""

    @property
    def pid(self) -> int:
        if self.process is None:
            raise BenchError(f"dmq-bus node {self.name} is not running")
        return self.process.pid

    def start(self) -> BusNode:
        """Spawn the process and wait for C{ready} (L{NODE_START_TIMEOUT})."""
        with open(self.logPath, "ab") as log:
            self.spawnedAt = time.monotonic()
            self.process = subprocess.Popen(
                self.command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
            )
        fields = self.expect("ready", NODE_START_TIMEOUT)
        self.startedAt = float(fields[0])
        return self

    def send(self, line: str) -> None:
        """Write one command line."""
        if self.process is None or self.process.stdin is None:
            raise BenchError(f"dmq-bus node {self.name} is not running")
        self.process.stdin.write(line.encode() + b"\n")
        self.process.stdin.flush()

    def expect(self, word: str, timeout: float) -> list[str]:
        """
        The fields after C{word} of the next line starting with C{word}
        (other lines are skipped).

        @raise BenchError: the process exited, or no such line in C{timeout} s.
        """
        if self.process is None or self.process.stdout is None:
            raise BenchError(f"dmq-bus node {self.name} is not running")
        fd = self.process.stdout.fileno()
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buffer:
                line, _, self._buffer = self._buffer.partition(b"\n")
                fields = line.decode().split(" ", 1)
                if fields[0] == word:
                    if len(fields) > 1 and word not in JSON_ANSWERS:
                        return fields[1].split()
                    return fields[1:]
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(
                    f"dmq-bus node {self.name}: no '{word}' within {timeout:g} s "
                    f"(log: {self.logPath})"
                )
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise BenchError(
                        f"dmq-bus node {self.name} exited (status {self.process.poll()}) "
                        f"while waiting for '{word}'; log: {self.logPath}"
                    )
                self._buffer += chunk

    def call(self, line: str, word: str, timeout: float) -> list[str]:
        """Send C{line}, return the fields of the answer starting with C{word}."""
        self.send(line)
        return self.expect(word, timeout)

    def activeNodes(self) -> int:
        """How many other nodes this node lists as active."""
        return int(self.call("active", "active", 5.0)[0])

    def count(self) -> int:
        """How many keys table C{kv} holds."""
        return int(self.call("count", "count", 5.0)[0])

    def stats(self) -> dict[str, int]:
        """Every counter of the node (its C{NodeStack.stats()} plus C{bytes.*} when counted)."""
        result: dict[str, int] = json.loads(self.call("stats", "stats", 10.0)[0])
        return result

    def set(self, key: str, value: str) -> None:
        """Set C{key} to the string C{value} (no blanks in either) on this node."""
        self.call(f"set {key} {value}", "stored", 5.0)

    def get(self, key: str) -> str | int | None:
        """The value of C{key} on this node, None when it holds none."""
        value: str | int | None = json.loads(self.call(f"get {key}", "value", 5.0)[0])
        return value

    def nodes(self) -> list[dict[str, Any]]:
        """
        This node's whole node list, itself included: one
        C{{"uri": "sip:IP:PORT", "status": "active", "local": False}} per entry.
        """
        result: list[dict[str, Any]] = json.loads(self.call("nodes", "nodes", 5.0)[0])
        return result

    def stop(self) -> None:
        """C{quit} (the node leaves the bus), then SIGTERM, then SIGKILL; always safe."""
        process = self.process
        if process is None:
            return
        self.process = None
        if process.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                assert process.stdin is not None
                process.stdin.write(b"quit\n")
                process.stdin.flush()
            try:
                process.wait(NODE_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(3.0)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                    process.wait(3.0)
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def __enter__(self) -> BusNode:
        return self.start()

    def __exit__(
        self,
        excType: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# ---------------------------------------------------------------------------
# Kamailio


def kamailioGroupPids(node: KamailioNode) -> list[int]:
    """The pids of every running process of a Kamailio node."""
    return node.livePids()


class KamailioRPC:
    """
    JSON-RPC to one Kamailio node over its jsonrpcs unix datagram socket
    (C{DIR/kamailio_rpc.sock}): much cheaper than a kamcmd process per call,
    so it can be polled every few milliseconds.
    """

    _ids = itertools.count(1)

    def __init__(self, node: KamailioNode, timeout: float = 10.0) -> None:
        self.path = os.path.join(node.dir, "kamailio_rpc.sock")
        self._dir = tempfile.mkdtemp(prefix="kr-")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(os.path.join(self._dir, "s"))
        self.sock.settimeout(timeout)

    def call(self, method: str, *params: str | int) -> Any:
        """The result of C{method}; L{BenchError} on an RPC error or no answer."""
        rid = next(self._ids)
        request: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": rid}
        if params:
            request["params"] = list(params)
        try:
            self.sock.sendto(json.dumps(request).encode(), self.path)
            while True:
                reply = json.loads(self.sock.recv(1 << 22).decode("utf-8", "replace"))
                if reply.get("id") == rid:
                    break
        except (OSError, ValueError) as e:
            raise BenchError(f"kamailio rpc {method} via {self.path}: {e}") from None
        if "error" in reply:
            raise BenchError(f"kamailio rpc {method}: {reply['error']}")
        return reply.get("result")

    def keys(self, table: str = "kv") -> int:
        """How many cells the table holds (C{htable.stats}, cheap)."""
        for entry in self.call("htable.stats"):
            if entry.get("name") == table:
                return int(entry["all"])
        raise BenchError(f"kamailio has no table {table!r}")

    def activeNodes(self) -> int:
        """How many other nodes the node lists as active."""
        nodes = self.call("dmq.list_nodes")
        return sum(1 for n in nodes if n.get("status") == "active" and not int(n.get("local", 0)))

    def openTransactions(self) -> int:
        """tm's current transactions (completed ones linger ~5 s in shm)."""
        stats = self.call("tm.stats")
        stats = stats[0] if isinstance(stats, list) else stats
        return int(stats.get("current", 0))

    def tmCreated(self) -> int:
        """tm transactions created so far (one per KDMQ the node sent)."""
        stats = self.call("tm.stats")
        stats = stats[0] if isinstance(stats, list) else stats
        return int(stats.get("created", 0))

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)


def sipBulk(port: int, prefix: str, count: int, timeout: float) -> float:
    """
    Send C{MESSAGE sip:htbulk@127.0.0.1:PORT} (the node sets C{count} keys
    C{prefix<i>} inside its config loop); block until its 200. The
    C{time.monotonic()} just before the request went out.

    @raise BenchError: an error answer, or none within C{timeout} s.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        myPort = sock.getsockname()[1]
        uri = f"sip:htbulk@127.0.0.1:{port}"
        tag = f"{os.getpid()}-{time.monotonic_ns()}"
        message = (
            f"MESSAGE {uri} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{myPort};branch=z9hG4bKbench{tag};rport\r\n"
            f"To: <{uri}>\r\n"
            f"From: <sip:bench@127.0.0.1:{myPort}>;tag={tag}\r\n"
            f"CSeq: 1 MESSAGE\r\n"
            f"Call-ID: bench-{tag}@127.0.0.1\r\n"
            f"Max-Forwards: 70\r\n"
            f"X-Prefix: {prefix}\r\n"
            f"X-Count: {count}\r\n"
            f"Content-Length: 0\r\n\r\n"
        ).encode()
        sock.settimeout(timeout)
        sentAt = time.monotonic()
        sock.sendto(message, ("127.0.0.1", port))
        while True:
            try:
                data = sock.recv(65535)
            except TimeoutError:
                raise BenchError(
                    f"kamailio {port}: no answer to htbulk ({count} sets) within {timeout:g} s"
                ) from None
            if data.startswith(b"SIP/2.0 2"):
                return sentAt
            if data.startswith(b"SIP/2.0 ") and int(data[8:11]) >= 300:
                raise BenchError(f"kamailio {port}: htbulk answered {data[:40]!r}")


# ---------------------------------------------------------------------------
# the node process itself


def _node(args: argparse.Namespace) -> None:  # pragma: no cover - runs in a child process
    """Run one dmq-bus benchmark node (see the module docstring) until C{quit}."""
    import cProfile

    from twisted.internet import reactor, stdio, task
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )
    from twisted.protocols.basic import LineReceiver

    from dmq_bus.bus.dispatch import BusConfig
    from dmq_bus.peers.htable import HTablePeer, TableSpec
    from dmq_bus.service import DMQService, NodeConfig
    from dmq_bus.sip.uri import SIPURI

    # warnings and errors go to stderr, which the benchmark sends to the node's log file
    globalLogBeginner.beginLoggingTo(
        [
            FilteringLogObserver(
                textFileLogObserver(sys.stderr),
                [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)],
            )
        ],
        redirectStandardIO=False,
    )
    profilers = [cProfile.Profile()] if args.profile else []
    seedHost = args.seed_host or args.host
    seeds = (SIPURI.parse(f"sip:{seedHost}:{args.seed}"),) if args.seed else ()
    config = NodeConfig(
        bus=BusConfig(
            serverAddress=SIPURI.parse(f"sip:{args.host}:{args.port}"),
            notificationAddresses=seeds,
        )
    )
    service = DMQService(config, reactor)
    peer = HTablePeer(service.bus, reactor, [TableSpec("kv")])
    service.bus.registerPeer(peer)
    found = peer.table("kv")
    assert found is not None
    table = found
    transactions = service.stack.transactions
    byteCounts = {"bytes.udp_received": 0, "datagrams.udp_received": 0}

    def say(line: str) -> None:
        transport: Any = commands.transport
        transport.write(line.encode() + b"\n")

    watches: list[int] = []

    def checkWatches() -> None:
        # polled every WATCH_INTERVAL s rather than observing every change:
        # an observer would cost ~1 µs per cell, 10% of a big sync
        have = len(table)
        for target in [w for w in watches if have >= w]:
            watches.remove(target)
            say(f"reached {target} {time.monotonic():.6f}")
        if not watches and watcher.running:
            watcher.stop()

    watcher = task.LoopingCall(checkWatches)

    def watch(target: int) -> None:
        watches.append(target)
        if not watcher.running:
            watcher.start(WATCH_INTERVAL, now=True)

    def fill(prefix: str, count: int) -> None:
        start = time.monotonic()
        progress = {"i": 0}

        def step() -> None:
            i = progress["i"]
            end = min(count, i + 10_000)
            for j in range(i, end):
                table.set(f"{prefix}{j}", f"v{j}")
            progress["i"] = end
            if end < count:
                reactor.callLater(0, step)  # type: ignore[attr-defined]
            else:
                say(f"filled {count} {time.monotonic() - start:.3f}")

        step()

    def write(prefix: str, count: int, batch: int, window: int) -> None:
        state = {"i": 0, "rejected": 0}
        started = time.monotonic()

        def step() -> None:
            if transactions.openClientTransactions > window:
                reactor.callLater(0.0005, step)  # type: ignore[attr-defined]
                return
            i = state["i"]
            end = min(count, i + batch)
            for j in range(i, end):
                try:
                    table.set(f"{prefix}{j}", f"v{j}")
                except Exception:
                    state["rejected"] += 1
            state["i"] = end
            if end < count:
                reactor.callLater(0, step)  # type: ignore[attr-defined]
            else:
                say(f"written {started:.6f} {time.monotonic():.6f} {state['rejected']}")

        step()

    def quit() -> None:
        d = service.stopService()
        d.addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]

    class Commands(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line: bytes) -> None:
            words = line.decode().split()
            if not words:
                return
            verb, rest = words[0], words[1:]
            if verb == "active":
                say(f"active {len(service.bus.nodeList.active())}")
            elif verb == "count":
                say(f"count {len(table)}")
            elif verb == "set":
                table.set(rest[0], rest[1])
                say(f"stored {rest[0]}")
            elif verb == "get":
                say("value " + json.dumps(table.get(rest[0])))
            elif verb == "nodes":
                entries = [
                    {"uri": str(n.uri), "status": n.status.word, "local": n.local}
                    for n in service.bus.nodeList.all()
                ]
                say("nodes " + json.dumps(entries, separators=(",", ":")))
            elif verb == "fill":
                fill(rest[0], int(rest[1]))
            elif verb == "write":
                write(rest[0], int(rest[1]), int(rest[2]), int(rest[3]))
            elif verb == "watch":
                watch(int(rest[0]))
            elif verb == "stats":
                say("stats " + json.dumps(service.stack.stats() | byteCounts))
            elif verb == "profile-restart":
                for profiler in profilers:
                    profiler.disable()
                profilers[:] = [cProfile.Profile() for _ in profilers]
                for profiler in profilers:
                    profiler.enable()
                say(f"profiling {len(profilers)}")
            elif verb == "quit":
                quit()
            else:
                say(f"error unknown command {verb}")

        def connectionLost(self, reason: object = None) -> None:
            # the benchmark went away: leave and exit
            if reactor.running:  # type: ignore[attr-defined]
                quit()

    if args.watch:
        watch(args.watch)

    def stopProfile() -> None:
        for profiler in profilers:
            profiler.disable()
            profiler.dump_stats(args.profile)

    reactor.addSystemEventTrigger("before", "shutdown", stopProfile)  # type: ignore[attr-defined]
    commands = Commands()
    stdio.StandardIO(commands)
    for profiler in profilers:
        profiler.enable()
    startedAt = time.monotonic()
    service.startService()
    if args.count_bytes:
        protocol: Any = service._ports[0].protocol  # type: ignore[attr-defined]
        receive = protocol.datagramReceived

        def counting(datagram: bytes, addr: Any) -> None:
            byteCounts["bytes.udp_received"] += len(datagram)
            byteCounts["datagrams.udp_received"] += 1
            receive(datagram, addr)

        protocol.datagramReceived = counting
    say(f"ready {startedAt:.6f}")
    reactor.run()  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description="benchmark helpers; 'node' runs one dmq-bus node")
    sub = parser.add_subparsers(dest="what", required=True)
    node = sub.add_parser("node", help="run one dmq-bus benchmark node (driven over stdin)")
    node.add_argument("--port", type=int, required=True)
    node.add_argument("--host", default="127.0.0.1", help="the node's IP address")
    node.add_argument("--seed", type=int, default=0, help="the seed's port (0: no seed)")
    node.add_argument("--seed-host", default="", help="the seed's IP address (default: --host)")
    node.add_argument("--watch", type=int, default=0)
    node.add_argument("--count-bytes", action="store_true")
    node.add_argument("--profile", default="")
    args = parser.parse_args()
    _node(args)


if __name__ == "__main__":
    main()
