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
import urllib.request
from collections import Counter
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests.interop.kamailio import allocatePorts  # noqa: E402

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
# Readings


def rssKiB(pid: int) -> int:
    """VmRSS of process C{pid} in KiB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


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


def startNode(port: int, controlPort: int, logPath: str) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        "-m",
        "twisted",
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
    port, controlPort = allocatePorts(2)
    workdir = tempfile.mkdtemp(prefix="dmq-fuzz-")
    logPath = os.path.join(workdir, "node.log")
    node = startNode(port, controlPort, logPath)
    try:
        return _run(args, node, port, controlPort, loopbackOnly, logPath)
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
) -> int:
    waitReady(node, controlPort)
    prober = Prober(port)
    if prober.udp() != 200:
        raise SystemExit("the node does not answer a valid KDMQ at start")
    time.sleep(0.5)
    baseline = rssKiB(node.pid)

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
    out("\nchecks\n")
    for label, ok in checks:
        out(f"  [{'ok' if ok else 'FAIL'}] {label}\n")
    if not alive:
        with open(logPath, "rb") as log:
            out("\nnode log tail:\n" + log.read()[-3000:].decode("utf-8", "replace") + "\n")
    vital = alive and finalUDP == 200 and finalTCP == 200
    return 0 if vital and all(ok for _, ok in checks) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=1_000_000, help="inputs to send")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rate", type=int, default=8_000, help="starting datagrams/s")
    parser.add_argument("--max-rate", type=int, default=40_000, help="highest datagrams/s")
    parser.add_argument("--tcp-share", type=float, default=0.03, help="share sent over TCP")
    parser.add_argument("--pool", type=int, default=50_000, help="distinct generated inputs")
    parser.add_argument("--rss-budget", type=int, default=200, help="MiB of RSS growth allowed")
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
