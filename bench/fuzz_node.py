"""
Throw a million hostile inputs at a real dmq-bus node process and check that
it survives them: still alive, still answering a valid KDMQ, memory bounded.

    python bench/fuzz_node.py                       # 1,000,000 inputs, seed 1
    python bench/fuzz_node.py --count 200000 --seed 7

The node is C{python -m twisted dmq} (the same as C{twist dmq}) on
127.0.0.1 with the htable peer (table C{kv}) and the control API on an
allocated port. The inputs come from a fast seeded generator (not
hypothesis): random bytes, truncated and mangled requests, broken headers,
bad URIs, hostile node lists, bad JSON to htable, absurd Content-Lengths,
hundreds of headers, garbage after valid requests, near-maximum datagrams,
and a flood of valid-looking requests with distinct branches. Most go over
UDP, paced so that the node's receive-buffer drops show but are not total
(the rate adapts to the drops); a share goes over TCP connections, and the
TCP side is also abused with stalled half-open connections (a partial
header, then nothing) opened up to and past the connection limit.

Along the way the node's RSS (/proc/PID/status VmRSS), its UDP drops and
its answers to a probe KDMQ are sampled. At the end: the node must be
alive, answer a valid KDMQ with 200 over UDP and TCP, and its RSS must have
stayed within --rss-budget MiB of its size after start-up; its C{dmq.stats}
counters are read through the control API. Exits 1 when any check fails.

Memory is explained, not only sampled: the node runs under L{runNode},
which writes from inside its process once a second the length of every
bounded table (transactions, nodes, tombstones, htable cells, TCP
connections and buffers, caches), pymalloc's arenas and glibc's heap
(in use and free), and on request live objects per type (and allocation
sites with --tracemalloc). After the inputs the node gets --quiet seconds
without input (longer than Timers F and J, 32 s), then a last reading and
C{malloc_trim(0)}; meanwhile this process measures the bytes of one record
of each transaction table with tracemalloc (L{measureEntrySizes}), so the
report shows the peak of each table, what it held, the ceiling at the
limits, and where the RSS is once every transaction is over.

Hostile bytes can name any address (a mangled Via, a node list, a sync
request's From): when run as root the whole benchmark re-executes itself in
a new network namespace (C{unshare --net}) that has only a loopback
interface, so nothing the node answers or pings can leave the machine.
Without that (C{--no-netns}, or not root) the generator leaves out the
inputs that could name a non-loopback address.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import gc
import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


HOST = "127.0.0.1"
NETNS_MARK = "DMQ_FUZZ_IN_NETNS"
MAX_CONNECTIONS = 1024  # the node's default TransportLimits.maxConnections

# ---------------------------------------------------------------------------
# The generator


BRANCH = b"z9hG4bKFUZZBRANCH"
"""Placeholder in every template, replaced by a fresh branch at send time."""


def request(
    port: int,
    myPort: int,
    channel: str = "htable",
    body: bytes = b"",
    *,
    transport: str = "UDP",
    contentType: str = "application/json",
    contentLength: str | None = None,
    extra: tuple[str, ...] = (),
    maxForwards: int = 1,
    fromURI: str | None = None,
) -> bytes:
    """A KDMQ request in Kamailio 5.6.3's header order, its branch a placeholder."""
    length = str(len(body)) if contentLength is None else contentLength
    lines = [
        f"KDMQ sip:{channel}@{HOST}:{port} SIP/2.0",
        f"Via: SIP/2.0/{transport} {HOST}:{myPort};branch={BRANCH.decode()}",
        f"To: <sip:{channel}@{HOST}:{port}>",
        f"From: <{fromURI or f'sip:{channel}@{HOST}:{myPort}'}>;tag={BRANCH.decode()}",
        "CSeq: 10 KDMQ",
        f"Call-ID: {BRANCH.decode()}@{HOST}",
        f"Content-Length: {length}",
        "User-Agent: fuzz",
        f"Max-Forwards: {maxForwards}",
        f"Content-Type: {contentType}",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body


NASTY = [
    "",
    ";",
    "<",
    '"',
    "\\",
    "@",
    "[::1",
    "sip:",
    "sip:@",
    "sip::5060",
    "sip:127.0.0.1:99999",
    "sip:127.0.0.1:-1",
    "SIP/2.0/UDP",
    "SIP/2.0/UDP 127.0.0.1:0;branch=",
    "SIP/2.0/UDP [::1;branch=z9hG4bKx",
    "0",
    "-1",
    "4294967296",
    "99999999999999999999999",
    "\x00",
    "\u00e9\u4e2d",
    "a" * 600,
    ";" * 300,
    "<" * 200,
    "10 KDMQ KDMQ",
]


class Generator:
    """Hostile inputs from one seed; C{loopbackOnly} keeps every address on 127.0.0.1."""

    def __init__(self, seed: int, port: int, myPort: int, loopbackOnly: bool) -> None:
        self.rng = random.Random(seed)
        self.port = port
        self.myPort = myPort
        self.loopbackOnly = loopbackOnly
        self.valid = request(port, myPort, body=self._set(0))
        self.validLines = self.valid.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")
        self.categories: list[tuple[str, int, Callable[[], bytes]]] = [
            ("random_bytes", 50, self.randomBytes),
            ("mangled", 0 if loopbackOnly else 60, self.mangled),
            ("truncated", 40, self.truncated),
            ("broken_headers", 50, self.brokenHeaders),
            ("bad_uris", 30, self.badURIs),
            ("node_lists", 30, self.nodeLists),
            ("htable_json", 50, self.htableJSON),
            ("content_length", 30, self.contentLength),
            ("many_headers", 15, self.manyHeaders),
            ("garbage_after", 30, self.garbageAfter),
            ("big_datagram", 1, self.bigDatagram),
            ("flood_valid", 100, self.floodValid),
        ]
        self._names = [name for name, weight, _ in self.categories if weight]
        self._makers = [maker for _, weight, maker in self.categories if weight]
        self._weights = [weight for _, weight, _ in self.categories if weight]

    def _set(self, n: int) -> bytes:
        return b'{"action":2,"htname":"kv","cname":"key-%d","type":2,"strval":"v%d","mode":0}' % (
            n % 10_000,
            n,
        )

    def pool(self, size: int) -> list[tuple[str, bytes]]:
        """C{size} inputs with their category names (branches still placeholders)."""
        choices = self.rng.choices(range(len(self._makers)), self._weights, k=size)
        return [(self._names[i], self._makers[i]()) for i in choices]

    def _text(self) -> str:
        rng = self.rng
        if rng.random() < 0.6:
            return rng.choice(NASTY)
        return "".join(chr(rng.randrange(1, 0x3000)) for _ in range(rng.randrange(30)))

    def randomBytes(self) -> bytes:
        rng = self.rng
        if rng.random() < 0.2:
            return rng.randbytes(rng.randrange(1, 64)) * rng.randrange(1, 100)
        return rng.randbytes(rng.randrange(0, 1500))

    def mangled(self) -> bytes:
        rng = self.rng
        data = bytearray(self.valid)
        for _ in range(rng.randrange(1, 5)):
            at = rng.randrange(len(data) + 1)
            kind = rng.randrange(4)
            if kind == 0:
                data[at:at] = rng.randbytes(rng.randrange(1, 20))
            elif kind == 1:
                del data[at : at + rng.randrange(1, 30)]
            elif kind == 2 and at < len(data):
                data[at] = rng.randrange(256)
            else:
                data[at:at] = data[max(0, at - 40) : at]
        return bytes(data)

    def truncated(self) -> bytes:
        data = self.valid
        return data[: self.rng.randrange(len(data))]

    def brokenHeaders(self) -> bytes:
        rng = self.rng
        lines = list(self.validLines)
        for _ in range(rng.randrange(1, 4)):
            index = rng.randrange(2, len(lines))  # keep the Via (responses go there)
            name = lines[index].split(":", 1)[0]
            if rng.random() < 0.2:
                name = self._text()
            separator = rng.choice([": ", ":", " : ", "", "\r\n ", "\n"])
            lines[index] = f"{name}{separator}{self._text()}"
        return "\r\n".join(lines).encode("utf-8", "surrogateescape") + b"\r\n\r\n" + self._set(1)

    def badURIs(self) -> bytes:
        rng = self.rng
        lines = list(self.validLines)
        bad = self._text()
        where = rng.randrange(3)
        if where == 0:
            lines[0] = f"{rng.choice(['KDMQ', 'OPTIONS', 'kdmq', 'X'])} {bad} SIP/2.0"
        elif where == 1:
            lines[3] = f"From: <{bad}>;tag=x"
        else:
            lines[2] = f"To: {bad}"
        return "\r\n".join(lines).encode("utf-8", "surrogateescape") + b"\r\n\r\n" + self._set(2)

    def nodeLists(self) -> bytes:
        rng = self.rng
        lines = []
        for _ in range(rng.randrange(0, 12)):
            host = f"127.0.{rng.randrange(256)}.{rng.randrange(1, 255)}"
            if not self.loopbackOnly and rng.random() < 0.1:
                host = rng.choice(["example.invalid", "10.255.1.2", "[::1]", "", "::"])
            port = rng.choice(["5060", "6000", "0", "65536", "-1", "x", str(rng.randrange(65536))])
            params = rng.sample(
                [
                    "status=active",
                    "status=pending",
                    "status=disabled",
                    "status=not_active",
                    "status=sleepy",
                    "transport=tcp",
                    "transport=sctp",
                    "x=" + "y" * rng.choice([10, 480, 600]),
                ],
                rng.randrange(0, 3),
            )
            line = f"sip:{host}:{port}" + "".join(f";{p}" for p in params)
            if rng.random() < 0.15:
                line = self._text()
            lines.append(line.encode("utf-8", "surrogateescape"))
        end = rng.choice([b"\r\n", b"\n", b"\r", b"\x00"])
        body = end.join(lines) + rng.choice([b"", end])
        return request(
            self.port,
            self.myPort,
            "notification_peer",
            body,
            contentType="text/plain",
            maxForwards=rng.choice([0, 1, 2]),
        )

    def htableJSON(self) -> bytes:
        rng = self.rng
        kind = rng.randrange(6)
        body: bytes
        if kind == 0:
            depth = rng.choice([100, 1000, 20000])
            body = b"[" * depth + rng.choice([b"", b"]" * depth])
        elif kind == 1:
            digits = rng.choice([20, 400, 4300, 5000, 20000])
            field = rng.choice(["action", "type", "intval", "mode"])
            fields = {"action": "2", "htname": '"kv"', "cname": '"big"', "type": "0"}
            fields |= {"intval": "1", "mode": "0"}
            fields[field] = rng.choice(["9", "-9", "1e", "0."]) + "9" * digits
            body = ("{" + ",".join(f'"{k}":{v}' for k, v in fields.items()) + "}").encode()
        elif kind == 2:
            wrong: list[Any] = [None, True, -1, 2**31, 2**64, 1e308, "2", "", [], {}, [2]]
            obj: dict[str, Any] = {"action": 2, "htname": "kv", "cname": "t", "type": 2}
            obj["strval"] = "v"
            for _ in range(rng.randrange(1, 3)):
                key = rng.choice(["action", "htname", "cname", "type", "strval", "intval"])
                obj[key] = rng.choice(wrong)
            body = json.dumps(obj).encode()
        elif kind == 3:
            body = rng.choice([b"{}", b"[]", b"", b"null", b"{", b"\x00", b'""', b'{"x":1}'])
        elif kind == 4:
            cells: list[dict[str, Any]] = [
                {
                    k: rng.choice([None, 1, "kv", "c", 2**40, [], -5])
                    for k in rng.sample(
                        ["htname", "cname", "type", "strval", "intval", "expire"], 4
                    )
                }
                for _ in range(rng.randrange(6))
            ]
            body = json.dumps({"cells": cells}).encode()
        else:
            body = rng.randbytes(rng.randrange(200))
        return request(self.port, self.myPort, "htable", body)

    def contentLength(self) -> bytes:
        rng = self.rng
        value = rng.choice(
            ["999999999", "1000000000", "4294967296", "-1", "1e3", "", " ", "1 2", "10" * 6]
        )
        return request(self.port, self.myPort, body=self._set(3), contentLength=value)

    def manyHeaders(self) -> bytes:
        rng = self.rng
        count = rng.randrange(230, 300)
        name = rng.choice(["X-Pad", "Route", "Content-Length", "v"])
        value = "SIP/2.0/UDP 127.0.0.1:1;branch=z9hG4bKp" if name == "v" else "1"
        return request(
            self.port, self.myPort, body=self._set(4), extra=(f"{name}: {value}",) * count
        )

    def garbageAfter(self) -> bytes:
        rng = self.rng
        return request(self.port, self.myPort, body=self._set(5)) + rng.randbytes(
            rng.randrange(300)
        )

    def bigDatagram(self) -> bytes:
        """A valid set whose datagram is close to the IPv4 UDP maximum (65,507)."""
        size = self.rng.randrange(60_000, 65_400)
        body = b'{"action":2,"htname":"kv","cname":"big","type":2,"strval":"%s"}' % (b"b" * size)
        return request(self.port, self.myPort, body=body)

    def floodValid(self) -> bytes:
        rng = self.rng
        choice = rng.randrange(4)
        if choice == 0:
            return request(self.port, self.myPort, f"chan{rng.randrange(10**6)}", b"x")
        if choice == 1:
            return self.valid.replace(b"KDMQ sip:", b"OPTIONS sip:", 1)
        return request(self.port, self.myPort, body=self._set(rng.randrange(10**6)))


# ---------------------------------------------------------------------------
# The node's side: memory readings written from inside the node process


def _parseMallocStats(text: str) -> dict[str, int]:
    """The totals of C{sys._debugmallocstats()} (pymalloc's arenas and blocks)."""
    wanted = {
        "# arenas allocated current": "arenas_current",
        "# arenas highwater mark": "arenas_highwater",
        "# bytes in allocated blocks": "allocated_bytes",
        "# bytes in available blocks": "available_bytes",
        "# bytes lost to pool headers": "pool_headers_bytes",
        "# bytes lost to quantization": "quantization_bytes",
        "# bytes lost to arena alignment": "alignment_bytes",
        "Total": "arena_bytes",  # the first Total: every arena, used or not
    }
    found: dict[str, int] = {}
    for line in text.splitlines():
        label, _, value = line.rpartition("=")
        label = label.strip()
        if label in wanted and wanted[label] not in found:
            with contextlib.suppress(ValueError):
                found[wanted[label]] = int(value.strip().replace(",", ""))
    return found


def _pymallocStats() -> dict[str, int]:
    """pymalloc totals: C{sys._debugmallocstats()} writes to fd 2, read back from a file."""
    debugMallocStats = getattr(sys, "_debugmallocstats", None)
    if debugMallocStats is None:
        return {}
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            debugMallocStats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        return _parseMallocStats(captured.read().decode("ascii", "replace"))


def _glibcMallocStats() -> dict[str, int]:
    """glibc's heap (C{mallinfo2}): what C{malloc} took from the OS and what is free in it."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_size_t)
            for name in (
                "arena",
                "ordblks",
                "smblks",
                "hblks",
                "hblkhd",
                "usmblks",
                "fsmblks",
                "uordblks",
                "fordblks",
                "keepcost",
            )
        ]

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):
        return {}
    mallinfo2.restype = MallInfo2
    info = mallinfo2()
    return {
        "heap_bytes": info.arena,  # sbrk heap of the main arena (+ other arenas)
        "heap_used_bytes": info.uordblks,
        "heap_free_bytes": info.fordblks,
        "mmap_bytes": info.hblkhd,  # large blocks mapped one by one
    }


def _requestBytes(transactions: Any) -> int:
    """
    Bytes of the requests that open client transactions keep: each its own
    head, each distinct body once (C{data} before the head and body split).
    """
    total = 0
    bodies: dict[int, int] = {}
    for txn in transactions:
        if hasattr(txn, "head"):
            total += len(txn.head)
            bodies[id(txn.body)] = len(txn.body)
        else:
            total += len(txn.data)
    return total + sum(bodies.values())


class NodeMemoryReport:
    """
    Inside the fuzzed node: every second one JSON line of light readings
    (RSS, the length of every bounded table, pymalloc and glibc totals);
    on SIGUSR1 one line of heavy readings (live objects per type, and the
    top allocation sites when tracemalloc runs). Reads the node's private
    attributes with C{getattr} defaults: a debugging aid, not an API.
    """

    def __init__(self, service: Any, reactor: Any, path: str) -> None:
        self.reactor = reactor
        self.path = path
        self.start = time.monotonic()
        node = next((s for s in service if hasattr(s, "stack")), None)
        self.stack = getattr(node, "stack", None)
        self.ports = list(getattr(node, "_ports", ()))
        self.heavyWanted = False

    def install(self) -> None:
        from twisted.internet.task import LoopingCall

        def askHeavy(signum: int, frame: Any) -> None:
            self.reactor.callFromThread(self.writeHeavy, signum == signal.SIGUSR2)

        signal.signal(signal.SIGUSR1, askHeavy)
        signal.signal(signal.SIGUSR2, askHeavy)
        self.writePorts()
        LoopingCall(self.writeLight).start(1.0)

    def writePorts(self) -> None:
        """
        The class of each listening port and the size of the buffer a UDP
        port reads every datagram into (L{ReusedBufferUDPPort}: one per
        port; C{udp.Port}: a new bytes object of C{maxPacketSize} per read).
        """
        self._write(
            {
                "kind": "ports",
                "ports": [
                    [
                        f"{type(p).__module__.rsplit('.', 1)[-1]}.{type(p).__qualname__}",
                        len(getattr(p, "_readBuffer", b"")) or None,
                    ]
                    for p in self.ports
                ],
            }
        )

    def _write(self, record: dict[str, Any]) -> None:
        record["t"] = round(time.monotonic() - self.start, 2)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def tables(self) -> dict[str, int]:
        """The size of every bounded (or suspect) structure of the node."""
        stack = self.stack
        if stack is None:
            return {}
        txns = stack.transactions
        found: dict[str, int] = {}
        clients = getattr(txns, "_clients", {})
        found["tx.client_open"] = len(clients)
        found["tx.client_open_bytes"] = _requestBytes(clients.values())
        first = getattr(txns, "_firstRetransmissions", None)
        found["tx.client_first_retransmission_queue"] = len(getattr(first, "_entries", ()))
        found["tx.client_completed"] = len(getattr(txns, "_clientsCompleted", ()))
        found["tx.server_open"] = len(getattr(txns, "_serversPending", ()))
        completed = getattr(txns, "_serversCompleted", None)
        entries = getattr(completed, "_entries", {})
        found["tx.server_completed"] = len(entries)
        found["tx.server_completed_bytes"] = sum(len(v) for _, v in entries.values())
        transport = stack.transport
        streams = getattr(transport, "_streams", ())
        found["tcp.connections"] = len(streams)
        found["tcp.buffered_bytes"] = sum(len(getattr(p, "_buffer", b"")) for p in streams)
        found["udp.origins_cache"] = len(getattr(transport, "_udpOrigins", ()))
        nodeList = stack.bus.nodeList
        found["nodes.listed"] = len(getattr(nodeList, "_nodes", ()))
        found["nodes.tombstones"] = len(getattr(nodeList, "_tombstones", ()))
        found["nodes.held"] = len(getattr(nodeList, "_held", ()))
        found["nodes.dmq_bus"] = len(getattr(nodeList, "_dmqBus", ()))
        bus = stack.bus
        found["bus.addressing_cache"] = len(getattr(bus, "_addressing", ()))
        found["bus.channel_names_cache"] = len(getattr(bus, "_counterNames", ()))
        health = getattr(stack.notification, "health", None)
        for name in ("_probing", "_suspicions", "_passive"):
            found[f"health.{name.strip('_')}"] = len(getattr(health, name, ()))
        found["notification.outstanding"] = len(getattr(stack.notification, "_outstanding", ()))
        for peer in bus.peers():
            for table in getattr(peer, "_tables", {}).values():
                found[f"htable.{table.name}.cells"] = len(table)
                found[f"htable.{table.name}.expiries"] = len(getattr(table, "_expiries", ()))
            for name in ("_syncing", "_resyncAt", "_resyncLater", "_chunksFrom"):
                if hasattr(peer, name):
                    found[f"htable.{name.strip('_')}"] = len(getattr(peer, name))
        counters = sum(len(c) for c in (transport.counters, txns.counters, bus.counters))
        found["counters.names"] = counters
        found["reactor.delayed_calls"] = len(self.reactor.getDelayedCalls())
        return found

    def writeLight(self) -> None:
        status = _procStatus(os.getpid())
        self._write(
            {
                "kind": "light",
                "rss_kib": status.get("VmRSS", 0),
                "hwm_kib": status.get("VmHWM", 0),
                "tables": self.tables(),
                "pymalloc": _pymallocStats(),
                "glibc": _glibcMallocStats(),
                "gc_counts": list(gc.get_count()),
            }
        )

    def writeHeavy(self, trim: bool = False) -> None:
        """
        Live objects per type, bytes per entry, top allocation sites; with
        C{trim}, then C{malloc_trim(0)} and the RSS after it: how much of
        what glibc keeps is free memory it could give back.
        """
        import ctypes
        import tracemalloc

        gc.collect()
        byType: Counter[str] = Counter()
        sizes: Counter[str] = Counter()
        objects = gc.get_objects()
        for obj in objects:
            name = type(obj).__qualname__
            byType[name] += 1
            sizes[name] += sys.getsizeof(obj)
        record: dict[str, Any] = {
            "kind": "heavy",
            "rss_kib": _procStatus(os.getpid()).get("VmRSS", 0),
            "gc_objects": len(objects),
            "gc_types": [[n, c, sizes[n]] for n, c in byType.most_common(20)],
        }
        del objects
        if tracemalloc.is_tracing():
            snapshot = tracemalloc.take_snapshot()
            stats = snapshot.statistics("lineno")
            record["tracemalloc_total"] = sum(s.size for s in stats)
            record["tracemalloc_top"] = [[str(s.traceback[0]), s.size, s.count] for s in stats[:25]]
        if trim:
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL("libc.so.6").malloc_trim(0)
                record["rss_after_trim_kib"] = _procStatus(os.getpid()).get("VmRSS", 0)
                record["glibc_after_trim"] = _glibcMallocStats()
        self._write(record)


def runNode(reportPath: str, tracemallocFrames: int, twistArguments: list[str]) -> None:
    """Run the node as C{twist} does, with a L{NodeMemoryReport} in its process."""
    import tracemalloc

    from twisted.application.twist._twist import Twist

    if tracemallocFrames:
        tracemalloc.start(tracemallocFrames)

    options = Twist.options(["twist", *twistArguments])
    reactor = options["reactor"]
    subCommand = options.subCommand
    assert subCommand is not None
    service = Twist.service(options.plugins[subCommand], options.subOptions)
    Twist.startService(reactor, service)
    NodeMemoryReport(service, reactor, reportPath).install()
    Twist.run(options)


# ---------------------------------------------------------------------------
# Readings


def _procStatus(pid: int) -> dict[str, int]:
    """The KiB figures of C{/proc/PID/status} (VmRSS, VmHWM, ...); empty once it is gone."""
    found: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if value.strip().endswith(" kB"):
                    found[name] = int(value.split()[0])
    except OSError:
        pass
    return found


def rssKiB(pid: int) -> int:
    """VmRSS of process C{pid} in KiB (0 once it is gone)."""
    return _procStatus(pid).get("VmRSS", 0)


def udpDrops(pid: int, port: int) -> int:
    """Datagrams the kernel dropped on the node's UDP socket (receive buffer full)."""
    try:
        with open(f"/proc/{pid}/net/udp") as f:
            next(f)
            for line in f:
                fields = line.split()
                if int(fields[1].split(":")[1], 16) == port:
                    return int(fields[-1])
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    return 0


def rpc(controlPort: int, method: str, *params: Any, timeout: float = 10.0) -> Any:
    """Call a JSON-RPC method of the node's control API; its result."""
    import urllib.request  # here: the node process runs this module too (runNode)

    body = json.dumps({"jsonrpc": "2.0", "method": method, "params": list(params), "id": 1})
    req = urllib.request.Request(
        f"http://{HOST}:{controlPort}/RPC",
        data=body.encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as response:
        answer = json.loads(response.read())
    if "error" in answer:
        raise RuntimeError(f"{method}: {answer['error']}")
    return answer["result"]


class Prober:
    """Sends a valid KDMQ from its own socket and waits for the answer."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.myPort: int = self.sock.getsockname()[1]
        self.count = 0
        self.latencies: list[float] = []
        self.failed = 0
        self.pending: dict[bytes, float] = {}
        self.codes: Counter[str] = Counter()

    def _probe(self) -> bytes:
        """Send one probe; its branch."""
        self.count += 1
        branch = f"z9hG4bKprobe{self.count}".encode()
        data = request(
            self.port,
            self.myPort,
            body=b'{"action":2,"htname":"kv","cname":"probe","type":0,"intval":1,"mode":0}',
        )
        self.sock.sendto(data.replace(BRANCH, branch), (HOST, self.port))
        return branch

    def send(self) -> None:
        """Send a probe without waiting; L{poll} collects its answer."""
        self.pending[self._probe()] = time.monotonic()

    def poll(self, lostAfter: float = 10.0) -> None:
        """Collect the answers to probes in flight; those older than C{lostAfter} are lost."""
        self.sock.setblocking(False)
        now = time.monotonic()
        while True:
            try:
                answer = self.sock.recv(65535)
            except OSError:
                break
            for branch, sent in list(self.pending.items()):
                if branch + b"\r\n" in answer or branch + b";" in answer:
                    del self.pending[branch]
                    self.latencies.append(now - sent)
                    self.codes[answer.split(b" ", 2)[1].decode()] += 1
        for branch, sent in list(self.pending.items()):
            if now - sent > lostAfter:
                del self.pending[branch]
                self.codes["no answer in 10 s"] += 1

    def udp(self, timeout: float = 3.0, attempts: int = 3) -> int | None:
        """The status code of the answer to a valid KDMQ over UDP, None if none came."""
        self.sock.setblocking(True)
        for _ in range(attempts):
            branch = self._probe()
            start = time.monotonic()
            deadline = start + timeout
            while (left := deadline - time.monotonic()) > 0:
                self.sock.settimeout(left)
                try:
                    answer = self.sock.recv(65535)
                except (TimeoutError, OSError):
                    break
                if answer.startswith(b"SIP/2.0 ") and (
                    branch + b"\r\n" in answer or branch + b";" in answer
                ):
                    return int(answer.split(b" ", 2)[1])
        self.failed += 1
        return None

    def tcp(self, timeout: float = 5.0) -> int | None:
        """The status code of the answer to a valid KDMQ on a new TCP connection."""
        try:
            with socket.create_connection((HOST, self.port), timeout=timeout) as conn:
                conn.settimeout(timeout)
                data = request(
                    self.port,
                    conn.getsockname()[1],
                    transport="TCP",
                    body=b'{"action":2,"htname":"kv","cname":"probe","type":0,"intval":2,"mode":0}',
                )
                conn.sendall(data.replace(BRANCH, b"z9hG4bKprobetcp"))
                answer = b""
                while b"\r\n\r\n" not in answer:
                    chunk = conn.recv(65535)
                    if not chunk:
                        return None
                    answer += chunk
                return int(answer.split(b" ", 2)[1])
        except OSError:
            return None


# ---------------------------------------------------------------------------
# TCP abuse


class StreamSenders:
    """
    A few TCP connections carrying hostile streams in random chunks (answers
    read and discarded); reopened when the node closes one.
    """

    def __init__(self, port: int, count: int) -> None:
        self.port = port
        self.conns: list[socket.socket | None] = [None] * count
        self.reopened = 0
        self.sent = 0
        self.refused = 0

    def _conn(self, index: int) -> socket.socket | None:
        conn = self.conns[index]
        if conn is None:
            # never wait for a connection: a busy node's full accept queue
            # would stall the sender for a SYN retransmission (1 s)
            conn = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            conn.setblocking(False)
            if conn.connect_ex((HOST, self.port)) not in (0, errno.EINPROGRESS):
                conn.close()
                self.refused += 1
                return None
            self.conns[index] = conn
            self.reopened += 1
        return conn

    def send(self, data: bytes, rng: random.Random) -> None:
        index = rng.randrange(len(self.conns))
        conn = self._conn(index)
        if conn is None:
            return
        try:
            with contextlib.suppress(BlockingIOError):
                while conn.recv(65536):
                    pass
            conn.sendall(data)  # non-blocking: may raise BlockingIOError when full
            self.sent += 1
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:
            if e.errno in (errno.ENOTCONN, errno.EAGAIN):
                return  # still connecting
            conn.close()
            self.conns[index] = None

    def close(self) -> None:
        for conn in self.conns:
            if conn is not None:
                conn.close()
        self.conns = [None] * len(self.conns)


def stallConnections(port: int, count: int, rng: random.Random) -> tuple[list[socket.socket], int]:
    """
    Open C{count} connections that each send a partial header and stall;
    those the node accepted (it closes refused ones at once) and how many it refused.
    """
    opened = []
    for i in range(count):
        try:
            conn = socket.create_connection((HOST, port), timeout=2)
        except OSError:
            continue
        with contextlib.suppress(OSError):
            conn.send(
                b"KDMQ sip:htable@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:1;bra"[
                    : rng.randrange(1, 60)
                ]
            )
        opened.append(conn)
        if i % 100 == 99:
            time.sleep(0.05)  # let the node accept
    time.sleep(1.0)
    alive, refused = [], 0
    for conn in opened:
        conn.setblocking(False)
        try:
            closed = conn.recv(1) == b""
        except BlockingIOError:
            closed = False
        except OSError:
            closed = True
        if closed:
            refused += 1
            conn.close()
        else:
            alive.append(conn)
    return alive, refused


# ---------------------------------------------------------------------------
# The run


def startNode(
    port: int,
    controlPort: int,
    logPath: str,
    reportPath: str,
    tracemallocFrames: int = 0,
) -> subprocess.Popen[bytes]:
    """The node, run as C{twist dmq} is, with its memory report (L{runNode})."""
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--run-node",
        reportPath,
        str(tracemallocFrames),
        "dmq",
        "--server-address",
        f"sip:{HOST}:{port}",
        "--control",
        f"tcp:{controlPort}:interface={HOST}",
        "--htable",
        "kv",
        "--log-level",
        "error",
    ]
    with open(logPath, "wb") as log:
        return subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )


def waitReady(node: subprocess.Popen[bytes], controlPort: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if node.poll() is not None:
            raise SystemExit(f"the node exited at start-up with {node.returncode}")
        try:
            rpc(controlPort, "dmq.stats", timeout=1.0)
            return
        except (OSError, RuntimeError):
            time.sleep(0.1)
    raise SystemExit("the node did not start within 30 s")


def stopNode(node: subprocess.Popen[bytes]) -> None:
    if node.poll() is None:
        node.send_signal(signal.SIGTERM)
        try:
            node.wait(10)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait(5)


def fuzz(args: argparse.Namespace, loopbackOnly: bool) -> int:
    from tests.interop.kamailio import allocatePorts

    port, controlPort = allocatePorts(2)
    workdir = tempfile.mkdtemp(prefix="dmq-fuzz-")
    logPath = os.path.join(workdir, "node.log")
    reportPath = args.memory_log or os.path.join(workdir, "memory.jsonl")
    node = startNode(port, controlPort, logPath, reportPath, args.tracemalloc)
    try:
        return _run(args, node, port, controlPort, loopbackOnly, logPath, reportPath)
    finally:
        stopNode(node)
        if node.returncode not in (0, None, -signal.SIGTERM):
            sys.stdout.write(f"node log kept in {logPath}\n")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _run(
    args: argparse.Namespace,
    node: subprocess.Popen[bytes],
    port: int,
    controlPort: int,
    loopbackOnly: bool,
    logPath: str,
    reportPath: str,
) -> int:
    waitReady(node, controlPort)
    prober = Prober(port)
    if prober.udp() != 200:
        raise SystemExit("the node does not answer a valid KDMQ at start")
    time.sleep(0.5)
    baseline = rssKiB(node.pid)
    heavyStart = heavyReading(node, reportPath)

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind((HOST, 0))
    sock.setblocking(False)
    myPort = sock.getsockname()[1]
    generator = Generator(args.seed, port, myPort, loopbackOnly)
    rng = random.Random(args.seed + 1)
    poolStart = time.monotonic()
    pool = generator.pool(args.pool)
    tcpPool = [
        (name, data.replace(b"SIP/2.0/UDP", b"SIP/2.0/TCP"))
        for name, data in generator.pool(max(1, args.pool // 10))
        if name != "big_datagram"
    ]
    poolSeconds = time.monotonic() - poolStart
    streams = StreamSenders(port, 8)

    sentBy: Counter[str] = Counter()
    rss: list[tuple[int, int]] = [(0, baseline)]
    dropsStart = udpDrops(node.pid, port)
    rate = float(args.rate)
    rates: list[float] = []
    stalled: list[socket.socket] = []
    stallRefused = 0
    probeCodes: Counter[str] = Counter()  # blocking probes with TCP connections at the limit
    sendErrors = 0
    tcpSent = 0
    dead = False

    start = time.monotonic()
    windowStart, windowSent, windowDrops = start, 0, dropsStart
    nextSample = start + 0.5
    nextProbe = start + 1.0
    stallAt = args.count // 2
    i = 0
    batch = 64
    while i < args.count:
        now = time.monotonic()
        if now >= nextProbe:
            nextProbe = now + 1.0
            prober.send()
        prober.poll()
        # pacing: never more than `rate` datagrams a second
        due = windowSent / rate if rate else 0.0
        if now - windowStart < due:
            time.sleep(min(0.01, due - (now - windowStart)))
            continue
        for _ in range(batch):
            if i >= args.count:
                break
            i += 1
            branch = b"z9hG4bK%x" % i
            if rng.random() < args.tcp_share:
                name, data = tcpPool[rng.randrange(len(tcpPool))]
                cut = rng.randrange(len(data) + 1)
                streams.send(data[:cut].replace(BRANCH, branch), rng)
                streams.send(data[cut:].replace(BRANCH, branch), rng)
                sentBy["tcp " + name] += 1
                tcpSent += 1
                continue
            name, data = pool[rng.randrange(len(pool))]
            try:
                sock.sendto(data.replace(BRANCH, branch), (HOST, port))
                sentBy[name] += 1
                windowSent += 1
            except (BlockingIOError, ConnectionRefusedError):
                sendErrors += 1
            except OSError as e:
                if e.errno != errno.EMSGSIZE:
                    raise
                sendErrors += 1
        with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
            while sock.recv(65535):  # answers: read and discard
                pass
        now = time.monotonic()
        if now >= nextSample:
            nextSample = now + 0.5
            rss.append((i, rssKiB(node.pid)))
            if node.poll() is not None:
                dead = True
                break
            # adapt: drops visible (a few percent) but never the bulk
            elapsed = now - windowStart
            if elapsed >= 1.0:
                drops = udpDrops(node.pid, port)
                share = (drops - windowDrops) / max(1, windowSent)
                rates.append(windowSent / elapsed)
                if share > 0.2:
                    rate = max(1000.0, rate * 0.8)
                elif share < 0.02:
                    rate = min(float(args.max_rate), rate * 1.1)
                windowStart, windowSent, windowDrops = now, 0, drops
        if i >= stallAt and not stalled:
            stalled, stallRefused = stallConnections(port, MAX_CONNECTIONS + 100, rng)
            code = prober.udp(timeout=5.0)
            probeCodes[f"{code}"] += 1
    elapsed = time.monotonic() - start
    lightAtEnd = len(readReport(reportPath, "light"))
    deadline = time.monotonic() + 10.0
    while prober.pending and time.monotonic() < deadline:
        time.sleep(0.1)
        prober.poll()

    # the end: drain, then check
    time.sleep(2.0)
    alive = node.poll() is None and not dead
    finalUDP = prober.udp(timeout=5.0, attempts=5) if alive else None
    tcpAtLimit = prober.tcp(timeout=3.0) if alive else None
    for conn in stalled:
        conn.close()
    streams.close()
    time.sleep(1.0)
    finalTCP = prober.tcp() if alive else None
    final = rssKiB(node.pid)
    peak = max(value for _, value in [*rss, (0, final)])
    drops = udpDrops(node.pid, port) - dropsStart
    stats: dict[str, Any] = {}
    statsError = ""
    if alive:
        try:
            stats = rpc(controlPort, "dmq.stats")
        except (OSError, RuntimeError) as e:
            statsError = str(e)
    half = next((value for n, value in rss if n >= args.count // 2), final)

    # memory after every transaction ended; meanwhile (the node idle) the
    # bytes per record, measured in this process
    quietEnd = time.monotonic() + args.quiet
    sizes = measureEntrySizes() if args.entry_sizes else None
    while time.monotonic() < quietEnd and node.poll() is None:
        time.sleep(0.5)
    heavyQuiet = heavyReading(node, reportPath, trim=True) if alive and args.quiet > 0 else None
    light = readReport(reportPath, "light")

    # the report
    out = sys.stdout.write
    out(
        f"\ndmq-bus fuzz: {args.count:,} inputs, seed {args.seed}, node pid {node.pid}, "
        f"udp+tcp {HOST}:{port}, control {controlPort}"
        f"{', network namespace' if os.environ.get(NETNS_MARK) else ''}\n"
    )
    out(
        f"generator pool: {len(pool):,} udp + {len(tcpPool):,} tcp templates "
        f"built in {poolSeconds:.1f} s\n\n"
    )
    out(f"{'input category':<34}{'sent':>12}\n")
    for name, count in sorted(sentBy.items(), key=lambda kv: -kv[1]):
        out(f"{name:<34}{count:>12,}\n")
    out(f"{'total':<34}{sum(sentBy.values()):>12,}\n\n")
    udpSent = sum(c for n, c in sentBy.items() if not n.startswith("tcp "))
    rows = [
        ("elapsed", f"{elapsed:.1f} s"),
        ("udp datagrams sent", f"{udpSent:,} ({udpSent / elapsed:,.0f}/s)"),
        ("udp send errors (ours)", f"{sendErrors:,}"),
        (
            "udp rate per window min/median/max",
            f"{min(rates, default=0):,.0f} / {sorted(rates)[len(rates) // 2] if rates else 0:,.0f} "
            f"/ {max(rates, default=0):,.0f} /s",
        ),
        ("node udp receive-buffer drops", f"{drops:,} ({100 * drops / max(1, udpSent):.1f}%)"),
        ("tcp messages sent", f"{tcpSent:,} on 8 connections, reopened {streams.reopened:,}"),
        (
            "new TCP connection at the limit",
            "refused" if tcpAtLimit is None else f"answered {tcpAtLimit}",
        ),
        (
            "stalled half-open connections",
            f"{len(stalled):,} held, {stallRefused:,} closed by the node (limit {MAX_CONNECTIONS})",
        ),
        (
            "probes (1/s) during the run",
            ", ".join(f"{k}: {v}" for k, v in sorted(prober.codes.items())),
        ),
        (
            "probe with connections at the limit",
            ", ".join(f"{k}: {v}" for k, v in sorted(probeCodes.items())),
        ),
        (
            "probe latency median/max",
            (
                f"{1000 * sorted(prober.latencies)[len(prober.latencies) // 2]:.1f} / "
                f"{1000 * max(prober.latencies):.1f} ms"
                if prober.latencies
                else "-"
            ),
        ),
        ("node listening ports", _portsLine(readReport(reportPath, "ports"))),
        ("RSS after start-up", f"{baseline / 1024:.1f} MiB"),
        ("RSS at half-way", f"{half / 1024:.1f} MiB"),
        ("RSS max", f"{peak / 1024:.1f} MiB"),
        ("RSS final", f"{final / 1024:.1f} MiB"),
    ]
    for label, value in rows:
        out(f"{label:<38}{value}\n")
    counters: dict[str, Any] = stats.get("counters", {}) if stats else {}
    if stats:
        out("\ndmq.stats counters (non-zero)\n")
        for key, value in sorted(counters.items()):
            if value:
                out(f"  {key:<50}{value:>14,}\n")
        for key, value in sorted(stats.items()):
            if key not in ("counters", "peers"):
                out(f"  {key:<50}{json.dumps(value)[:200]}\n")
    elif statsError:
        out(f"\ndmq.stats failed: {statsError}\n")

    if light:
        memoryReport(out, args, light, lightAtEnd, heavyStart, heavyQuiet, sizes, baseline)

    checks = [
        ("node process alive", alive),
        ("answers a valid KDMQ over UDP with 200", finalUDP == 200),
        (
            "TCP connections past the limit refused (tcp.connections_refused_limit)",
            counters.get("tcp.connections_refused_limit", 0) > 0,
        ),
        ("answers a valid KDMQ over TCP with 200 (stalled ones closed)", finalTCP == 200),
        (
            f"RSS bounded (max within {args.rss_budget} MiB of start-up)",
            peak <= baseline + args.rss_budget * 1024,
        ),
        ("dmq.stats readable through the control API", bool(stats)),
    ]
    if elapsed / 2 > 40:  # the tables reach their steady length within Timer J (32 s)
        firstHalf, secondHalf = half - baseline, rss[-1][1] - half
        checks.append(
            (
                f"RSS levels off: the second half of the inputs added {secondHalf / 1024:.1f} MiB,"
                f" the first {firstHalf / 1024:.1f} (at most 15% of it)",
                secondHalf <= 0.15 * firstHalf,
            )
        )
    if light and args.quiet >= 33:  # longer than Timers F and J (32 s): every table empty
        left = {k: v for k, v in light[-1]["tables"].items() if k.startswith("tx.") and v}
        checks.append((f"every transaction table empty after {args.quiet:.0f} s quiet", not left))
    out("\nchecks\n")
    for label, ok in checks:
        out(f"  [{'ok' if ok else 'FAIL'}] {label}\n")
    if not alive:
        with open(logPath, "rb") as log:
            out("\nnode log tail:\n" + log.read()[-3000:].decode("utf-8", "replace") + "\n")
    vital = alive and finalUDP == 200 and finalTCP == 200
    return 0 if vital and all(ok for _, ok in checks) else 1


def _portsLine(records: list[dict[str, Any]]) -> str:
    """The node's listening ports (L{NodeMemoryReport.writePorts}) on one line."""
    if not records:
        return "-"
    return ", ".join(
        name if size is None else f"{name} (reads into one {size:,}-byte buffer)"
        for name, size in records[0]["ports"]
    )


def readReport(path: str, kind: str) -> list[dict[str, Any]]:
    """The records of one kind the node wrote so far (L{NodeMemoryReport})."""
    try:
        with open(path) as f:
            lines = f.readlines()
    except OSError:
        return []
    records = []
    for line in lines:
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if record.get("kind") == kind:
                records.append(record)
    return records


def heavyReading(
    node: subprocess.Popen[bytes], path: str, trim: bool = False, timeout: float = 120.0
) -> dict[str, Any] | None:
    """Ask the node for a heavy reading (SIGUSR1; SIGUSR2 to trim after it) and wait for it."""
    before = len(readReport(path, "heavy"))
    node.send_signal(signal.SIGUSR2 if trim else signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and node.poll() is None:
        time.sleep(0.2)
        records = readReport(path, "heavy")
        if len(records) > before:
            return records[-1]
    return None


class _NullDatagrams:
    """The UDP socket of L{measureEntrySizes}: writes go nowhere (the last ones are kept)."""

    def __init__(self) -> None:
        self.written: list[tuple[bytes, Any]] = []

    def write(self, packet: bytes, addr: Any = None) -> None:
        self.written.append((packet, addr))
        if len(self.written) > 1:
            del self.written[0]

    def getHost(self) -> Any:
        from twisted.internet.address import IPv4Address

        return IPv4Address("UDP", HOST, 5060)


def measureEntrySizes(count: int = 10_000) -> dict[str, float]:
    """
    Bytes one record of each transaction table holds in a real node stack
    (the layers of C{NodeStack} with the htable peer, on a C{Clock}, over a
    socket that sends nothing), measured with tracemalloc over C{count}
    records, in this process:
      - C{tx.server_completed}: an htable set answered 200, kept for Timer J;
      - C{tx.server_open}: a request whose peer has not answered yet;
      - C{tx.client_open}: an htable set to a node that does not answer;
      - C{tx.client_open (broadcast)}: the same with a 35 kB node-list body
        given to every send, as a broadcast does (the body is shared);
      - C{tx.client_completed}: an htable set answered 200 over UDP, kept
        for Timer K.
    The parser's bounded caches (4,096 header lines, 1,024 Via heads) are
    filled before: they are the node's, not the records'.
    """
    import tracemalloc

    from twisted.internet.defer import Deferred
    from twisted.internet.task import Clock
    from zope.interface import implementer

    from dmq_bus.bus.dispatch import BusConfig
    from dmq_bus.bus.values import DMQMessage, Node, NodeStatus
    from dmq_bus.interfaces import IDMQPeer
    from dmq_bus.peers.htable import HTablePeer, TableSpec
    from dmq_bus.service import NodeConfig, NodeStack
    from dmq_bus.sip.message import makeResponse
    from dmq_bus.sip.parser import parseMessage
    from dmq_bus.sip.uri import SIPURI

    @implementer(IDMQPeer)
    class Silent:
        channel = "silent"
        description = "never answers"

        def messageReceived(self, message: DMQMessage) -> Deferred[Any]:
            return Deferred()

        def busJoined(self) -> None:
            pass

    def stack() -> Any:
        clock = Clock()
        config = NodeConfig(bus=BusConfig(serverAddress=SIPURI(host=HOST, port=5060)))
        node = NodeStack(config, clock, None)
        node.bus.registerPeer(HTablePeer(node.bus, clock, [TableSpec("kv")]))
        node.bus.registerPeer(Silent())
        protocol = node.transport.datagramProtocol()
        protocol.makeConnection(_NullDatagrams())  # type: ignore[arg-type]
        node.clock = clock  # type: ignore[attr-defined]
        return node, protocol

    def held(work: Callable[[], object]) -> float:
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            kept = work()
            gc.collect()
            after = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        del kept
        return (after - before) / count

    sizes: dict[str, float] = {}
    peerPort = 43210
    for name, channel in (("tx.server_completed", "htable"), ("tx.server_open", "silent")):
        node, protocol = stack()
        template = request(5060, peerPort, channel, Generator(0, 5060, peerPort, True)._set(7))
        datagrams = [template.replace(BRANCH, b"z9hG4bK%x" % i) for i in range(count)]

        def receive(protocol: Any = protocol, datagrams: list[bytes] = datagrams) -> None:
            for datagram in datagrams:
                protocol.datagramReceived(datagram, (HOST, peerPort))

        sizes[name] = held(receive)
    body = Generator(0, 5060, peerPort, True)._set(7)
    # one node: the bus's caches per node (addressing, origins) are not per transaction
    target = Node.fromURI(SIPURI(host=HOST, port=40_000), NodeStatus.ACTIVE)
    nodeList = b"".join(
        b"sip:127.0.%d.%d:5060;status=active\r\n" % divmod(i, 250) for i in range(1000)
    )
    for name, payload in (("tx.client_open", body), ("tx.client_open (broadcast)", nodeList)):
        node, _ = stack()
        targets = [target] * count

        def send(
            node: Any = node, targets: list[Any] = targets, payload: bytes = payload
        ) -> list[Any]:
            return [node.bus.send("htable", t, payload, "text/plain") for t in targets]

        sizes[name] = held(send)

    # answered over UDP: kept for Timer K
    def sendAndAnswer(node: Any, protocol: Any) -> None:
        socket = protocol.transport
        for _ in range(count):
            node.bus.send("htable", target, body, "text/plain")
            sent, addr = socket.written[-1]
            answer = makeResponse(parseMessage(sent).headers, 200, "OK").toBytes()
            protocol.datagramReceived(answer, addr)
        node.clock.advance(1.0)  # past T1: the first-retransmission queue lets them go

    sendAndAnswer(*stack())  # fills the parser's caches with such lines
    node, protocol = stack()
    sizes["tx.client_completed"] = held(functools.partial(sendAndAnswer, node, protocol))
    return sizes


TABLE_LIMITS = {
    "tx.client_open": 100_000,
    "tx.server_open": 200_000,
    "tx.server_completed": 500_000,
    "tx.client_completed": 500_000,
    "tcp.connections": MAX_CONNECTIONS,
    "nodes.listed": 1024,
}
"""The node's default limits (README, "Limits and what happens at them")."""


def memoryReport(
    out: Callable[[str], object],
    args: argparse.Namespace,
    light: list[dict[str, Any]],
    lightAtEnd: int,
    heavyStart: dict[str, Any] | None,
    heavyQuiet: dict[str, Any] | None,
    sizes: dict[str, float] | None,
    baseline: int,
) -> None:
    """Print what holds the node's memory: peak, end of inputs, after the quiet period."""
    MiB = 1024 * 1024
    first = light[0]
    atEnd = light[max(0, min(lightAtEnd, len(light)) - 1)]
    last = light[-1]
    peakAt = max(light, key=lambda r: r["rss_kib"])
    readings = (first, peakAt, atEnd, last)
    quiet = f"after {args.quiet:.0f} s quiet"
    out(f"\nmemory, read inside the node once a second ({len(light)} readings)\n")
    out(f"{'':<40}{'start-up':>12}{'peak':>12}{'end of inputs':>15}{quiet:>18}{'limit':>10}\n")

    def row(label: str, values: list[str], limit: str = "") -> None:
        cells = "".join(f"{v:>{w}}" for v, w in zip(values, (12, 12, 15, 18)))
        out(f"  {label:<38}{cells}{limit:>10}\n")

    def mib(v: float) -> str:
        return f"{v / MiB:,.1f} MiB"

    row("RSS", [mib(1024 * r["rss_kib"]) for r in readings])
    names = sorted({name for r in light for name in r["tables"]})
    for name in names:
        peak = max(r["tables"].get(name, 0) for r in light)
        values = [first["tables"].get(name, 0), peak]
        values += [atEnd["tables"].get(name, 0), last["tables"].get(name, 0)]
        limit = TABLE_LIMITS.get(name)
        texts = [mib(v) if name.endswith("bytes") else f"{v:,}" for v in values]
        row(name, texts, f"{limit:,}" if limit else "")
    for group, fields in (
        ("pymalloc", ("arena_bytes", "allocated_bytes", "available_bytes")),
        ("glibc", ("heap_bytes", "heap_used_bytes", "heap_free_bytes", "mmap_bytes")),
    ):
        for field in fields:
            values = [r.get(group, {}).get(field) for r in readings]
            if any(v is not None for v in values):
                row(f"{group} {field}", [mib(v or 0) for v in values])
    row(
        "pymalloc arenas (current)",
        [f"{r.get('pymalloc', {}).get('arenas_current', 0):,}" for r in readings],
    )
    out("  (peak: the reading with the highest RSS; for a table, its own highest length)\n")

    out("\nover time (MiB; pymalloc: arenas / in use; glibc heap: size / in use)\n")
    out(f"  {'s':>5}{'RSS':>8}{'pymalloc':>16}{'glibc heap':>16}{'server completed':>18}")
    out(f"{'client open':>13}{'nodes':>7}\n")
    step = max(1, len(light) // 16)
    for r in [*light[::step], last] if (len(light) - 1) % step else light[::step]:
        py, heap, tables = r.get("pymalloc", {}), r.get("glibc", {}), r["tables"]
        out(
            f"  {r['t']:>5.0f}{r['rss_kib'] / 1024:>8.1f}"
            f"{py.get('arena_bytes', 0) / MiB:>9.1f} /{py.get('allocated_bytes', 0) / MiB:>5.1f}"
            f"{heap.get('heap_bytes', 0) / MiB:>9.1f} /{heap.get('heap_used_bytes', 0) / MiB:>5.1f}"
            f"{tables.get('tx.server_completed', 0):>18,}{tables.get('tx.client_open', 0):>13,}"
            f"{tables.get('nodes.listed', 0):>7,}\n"
        )

    if sizes:
        out(
            "\nbytes per record (tracemalloc over the node's layers, in this process) and ceilings\n"
        )
        out(f"  {'table':<30}{'B/record':>10}{'fuzz peak':>11}{'at that peak':>14}")
        out(f"{'limit':>10}{'at the limit':>14}\n")
        total = 0.0
        for name, size in sizes.items():
            table = name.split(" ")[0]
            limit = TABLE_LIMITS.get(table, 0)
            peak = max(r["tables"].get(table, 0) for r in light) if " " not in name else 0
            if " " not in name:
                total += size * limit
            out(
                f"  {name:<30}{size:>10,.0f}{peak:>11,}{mib(size * peak):>14}"
                f"{limit:>10,}{mib(size * limit):>14}\n"
            )
        out(f"  {'all four tables at their limits':<75}{mib(total):>14}\n")
        out("  (an open client transaction also holds its body: one per broadcast, shared)\n")

    if heavyStart and heavyQuiet:
        before = {name: count for name, count, _ in heavyStart["gc_types"]}
        grown = sorted(
            (
                (count - before.get(name, 0), name, count)
                for name, count, _ in heavyQuiet["gc_types"]
            ),
            reverse=True,
        )
        out(f"\nobjects tracked by gc: {heavyStart['gc_objects']:,} at start-up, ")
        out(f"{heavyQuiet['gc_objects']:,} {quiet}; the types that grew most\n")
        for more, name, count in grown[:6]:
            out(f"  {name:<38}{count:>10,} (+{more:,})\n")
    if heavyQuiet and "tracemalloc_top" in heavyQuiet:
        out(f"tracemalloc {quiet}: {heavyQuiet['tracemalloc_total'] / MiB:,.1f} MiB; top sites\n")
        for site, size, count in heavyQuiet["tracemalloc_top"][:10]:
            out(f"    {size / MiB:>8,.1f} MiB {count:>10,}  {site}\n")

    py, heap = last.get("pymalloc", {}), last.get("glibc", {})
    out(f"\nwhere the RSS is {quiet} (every transaction over): {last['rss_kib'] / 1024:.1f} MiB\n")
    if py:
        out(
            f"  pymalloc arenas (objects <= 512 B)   {mib(py.get('arena_bytes', 0)):>12}: "
            f"{mib(py.get('allocated_bytes', 0))} in use, "
            f"{mib(py.get('arena_bytes', 0) - py.get('allocated_bytes', 0))} free inside arenas "
            f"(start-up: {mib(first.get('pymalloc', {}).get('arena_bytes', 0))})\n"
        )
    if heap:
        out(
            f"  glibc heap (larger blocks)           {mib(heap.get('heap_bytes', 0)):>12}: "
            f"{mib(heap.get('heap_used_bytes', 0))} in use, "
            f"{mib(heap.get('heap_free_bytes', 0))} free "
            f"(start-up: {mib(first.get('glibc', {}).get('heap_bytes', 0))})\n"
        )
    if heavyQuiet and "rss_after_trim_kib" in heavyQuiet:
        trimmed = heavyQuiet["rss_after_trim_kib"]
        out(
            f"  after malloc_trim(0): RSS {trimmed / 1024:.1f} MiB "
            f"({(last['rss_kib'] - trimmed) / 1024:.1f} MiB of free glibc pages given back)\n"
        )
    out(
        f"  RSS: start-up {baseline / 1024:.1f} MiB, peak {peakAt['rss_kib'] / 1024:.1f} MiB, "
        f"end of inputs {atEnd['rss_kib'] / 1024:.1f} MiB, {quiet} {last['rss_kib'] / 1024:.1f} MiB\n"
    )


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--run-node"]:  # the node process itself (see startNode)
        runNode(argv[1], int(argv[2]), argv[3:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=1_000_000, help="inputs to send")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rate", type=int, default=8_000, help="starting datagrams/s")
    parser.add_argument("--max-rate", type=int, default=40_000, help="highest datagrams/s")
    parser.add_argument("--tcp-share", type=float, default=0.03, help="share sent over TCP")
    parser.add_argument("--pool", type=int, default=50_000, help="distinct generated inputs")
    parser.add_argument(
        "--rss-budget",
        type=int,
        default=320,
        help="MiB of RSS growth allowed (default: what the completed-transaction table holds"
        " at ~5,000 answered requests/s, ~90 MiB, with the allocators' retention, ~120 MiB"
        " (~175 before the node read UDP into one buffer): see the memory report)",
    )
    parser.add_argument(
        "--quiet",
        type=float,
        default=40.0,
        help="seconds without input at the end (longer than Timers F, J: 32 s), then memory again",
    )
    parser.add_argument(
        "--no-entry-sizes",
        dest="entry_sizes",
        action="store_false",
        help="do not measure the bytes per transaction record (15 s of CPU in the quiet period)",
    )
    parser.add_argument(
        "--memory-log", metavar="PATH", help="keep the node's memory readings (JSON lines) there"
    )
    parser.add_argument(
        "--tracemalloc",
        type=int,
        default=0,
        metavar="FRAMES",
        help="trace the node's allocations (slower node) and print its top allocation sites",
    )
    parser.add_argument(
        "--no-netns", action="store_true", help="do not run inside a new network namespace"
    )
    args = parser.parse_args(argv)

    inNetns = os.environ.get(NETNS_MARK) == "1"
    if not args.no_netns and not inNetns:
        if os.geteuid() == 0 and shutil.which("unshare") and shutil.which("ip"):
            env = dict(os.environ, **{NETNS_MARK: "1"})
            script = os.path.abspath(__file__)
            command = ["unshare", "--net", "--", sys.executable, script, *sys.argv[1:]]
            return subprocess.call(command, env=env)
        sys.stderr.write("not root: no network namespace; only loopback-safe inputs are sent\n")
    if inNetns:
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = MAX_CONNECTIONS + 512
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    return fuzz(args, loopbackOnly=not inNetns)


if __name__ == "__main__":
    sys.exit(main())
