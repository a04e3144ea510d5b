"""
Real Kamailio 5.6.3 DMQ nodes on 127.0.0.1, for interop tests and benchmarks.

A L{KamailioNode} runs one C{kamailio} process group with the project's own
config (C{tests/interop/kamailio-node.cfg}, next to this file): a DMQ node
listening on udp+tcp 127.0.0.1:PORT, with the htable C{kv} replicated over DMQ.
It is driven through C{kamcmd} on the node's ctl socket; every call is a short
blocking subprocess, which is acceptable in tests and benchmark scripts.

Typical trial use (real reactor)::

    skip = None if kamailioAvailable() else SKIP_REASON

    def test_x(self):
        base = tempfile.mkdtemp(prefix="dmqk-")
        self.addCleanup(shutil.rmtree, base, True)
        seedPort, port = allocatePorts(2)
        seed = KamailioNode(seedPort, baseDir=base)
        self.addCleanup(seed.stop)
        seed.start()
        ...
        return waitFor(lambda: len(seed.listNodes()) == 2, timeout=5)

Scripts use L{waitUntil} instead of L{waitFor}, and C{with KamailioNode(...)}.

A node made with C{transport="tls"} runs C{kamailio-tls.cfg} instead: the
same node with the tls module, DMQ over TLS on PORT and udp+tcp moved to a
second port (L{KamailioNode.plainPort}); see L{TLSFiles} and
L{kamailioTLSAvailable}.

Only the standard library is used, plus Twisted for L{waitFor}. Nothing binds
or talks to an address outside 127.0.0.0/8.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, Protocol, TypeAlias, TypedDict

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

__all__ = [
    "CONFIG_PATH",
    "SKIP_REASON",
    "TLS_CONFIG_PATH",
    "TLS_SKIP_REASON",
    "DMQNode",
    "KamailioError",
    "KamailioNode",
    "KamailioRPCError",
    "TLSFiles",
    "WaitTimeout",
    "allocatePorts",
    "kamailioAvailable",
    "kamailioTLSAvailable",
    "kamcmdPath",
    "kamailioPath",
    "parseKamcmdOutput",
    "releasePorts",
    "tlsConfigIncluding",
    "waitFor",
    "waitUntil",
    "bothActive",
]

#: The node config shipped with the project (all per-node values are -A defines).
CONFIG_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kamailio-node.cfg")

#: The same node over TLS: includes kamailio-node.cfg, adds the tls module.
TLS_CONFIG_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kamailio-tls.cfg")

#: Why interop tests are skipped when Kamailio is missing. Loud on purpose:
#: trial prints it in its summary, and .ci/run repeats a warning when it sees it.
SKIP_REASON = (
    "!!! KAMAILIO NOT INSTALLED: interop tests against real Kamailio 5.6.3 SKIPPED "
    "(apt-get install kamailio) !!!"
)

#: Why TLS interop tests are skipped when Kamailio's tls module (or Kamailio)
#: is missing; .ci/run looks for "KAMAILIO TLS" in the skip reasons.
TLS_SKIP_REASON = (
    "!!! KAMAILIO TLS MODULE NOT INSTALLED: TLS interop tests against real Kamailio 5.6.3 "
    "SKIPPED (apt-get install kamailio kamailio-tls-modules) !!!"
)

#: The only address anything here binds to or talks to.
LOOPBACK = "127.0.0.1"

#: Ports handed out by L{allocatePorts}: below Linux's ephemeral range
#: (32768-60999), away from SIP's 5060 and from the shared harness's 15060+.
PORT_RANGE = range(25000, 30000)

#: How long L{KamailioNode.start} waits for the ctl socket to answer.
START_TIMEOUT = 10.0
#: How long L{KamailioNode.stop} waits after SIGTERM before SIGKILL.
STOP_TIMEOUT = 10.0
#: How long one kamcmd call may take before L{KamailioError}.
RPC_TIMEOUT = 5.0
#: A unix socket path must fit in sun_path (108 bytes on Linux, NUL included).
_MAX_UNIX_PATH = 107


class KamailioError(Exception):
    """
    A Kamailio node could not be started, stopped or reached.
    """


class KamailioRPCError(KamailioError):
    """
    kamcmd answered with an error (C{error: CODE - MESSAGE}) or failed.

    @ivar code: the RPC error code (e.g. 500, 404), or L{None} when kamcmd
        itself failed (exit status != 0, e.g. the ctl socket is gone).
    @ivar message: the error text.
    """

    def __init__(self, method: str, code: int | None, message: str) -> None:
        super().__init__(f"kamcmd {method}: {code if code is not None else 'failed'}: {message}")
        self.method = method
        self.code = code
        self.message = message


class WaitTimeout(Exception):
    """
    A condition polled by L{waitFor} or L{waitUntil} did not become true in time.
    """


class DMQNode(TypedDict):
    """
    One entry of C{kamcmd dmq.list_nodes}, with the values converted.
    """

    host: str
    port: int
    #: C{"*"} when the server_address has no ;transport=, else e.g. C{"tcp"}
    proto: str
    resolved_ip: str
    #: C{"active"}, C{"disabled"}, C{"timeout"} or C{"pending"}
    status: str
    last_notification: int
    #: True for the node's own entry
    local: bool


# --------------------------------------------------------------------------
# finding the binaries


def _findBinary(envName: str, name: str) -> str | None:
    explicit = os.environ.get(envName)
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    found = shutil.which(name)
    if found:
        return found
    # /usr/sbin is not on a non-root PATH on Debian
    fallback = os.path.join("/usr/sbin", name)
    return fallback if os.access(fallback, os.X_OK) else None


def kamailioPath() -> str | None:
    """
    The kamailio binary ($KAMAILIO_BIN, else PATH, else /usr/sbin), or None.
    """
    return _findBinary("KAMAILIO_BIN", "kamailio")


def kamcmdPath() -> str | None:
    """
    The kamcmd binary ($KAMCMD_BIN, else PATH, else /usr/sbin), or None.
    """
    return _findBinary("KAMCMD_BIN", "kamcmd")


def kamailioAvailable() -> bool:
    """
    Whether both kamailio and kamcmd are installed, so interop tests can run.
    """
    return kamailioPath() is not None and kamcmdPath() is not None


_tlsAvailable: bool | None = None


def kamailioTLSAvailable() -> bool:
    """
    Whether Kamailio is available (L{kamailioAvailable}) and loads its tls
    module (Debian: package C{kamailio-tls-modules}), checked once by
    C{kamailio -c} on a config that only loads C{tls.so}.
    """
    global _tlsAvailable
    if _tlsAvailable is None:
        _tlsAvailable = kamailioAvailable() and _loadsTLSModule()
    return _tlsAvailable


def _loadsTLSModule() -> bool:
    binary = kamailioPath()
    assert binary is not None
    with tempfile.TemporaryDirectory(prefix="dmqk-tls-") as directory:
        config = os.path.join(directory, "tls-check.cfg")
        with open(config, "w") as f:
            f.write('#!KAMAILIO\nloadmodule "tls.so"\n')
        try:
            result = subprocess.run(
                [binary, "-c", "-f", config],
                capture_output=True,
                timeout=RPC_TIMEOUT,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
    return result.returncode == 0


class TLSFiles(Protocol):
    """
    The PEM files of a TLS node (C{tests.certificates.NodeFiles} is one):
    its certificate, its unencrypted private key, and the CA bundle every
    peer's certificate must chain to.
    """

    @property
    def certificate(self) -> str: ...

    @property
    def key(self) -> str: ...

    @property
    def ca(self) -> str: ...


def tlsConfigIncluding(base: str, directory: str) -> str:
    """
    Write into C{directory} a copy of C{kamailio-tls.cfg} that includes the
    node config C{base} (e.g. one with more tables) instead of
    C{kamailio-node.cfg}; its path, to pass as C{KamailioNode(config=...)}.
    """
    with open(TLS_CONFIG_PATH) as f:
        text = f.read()
    include = 'include_file "kamailio-node.cfg"'
    if include not in text:
        raise RuntimeError(f"{TLS_CONFIG_PATH} no longer has the line {include}")
    path = os.path.join(directory, "tls-" + os.path.basename(base))
    with open(path, "w") as f:
        f.write(text.replace(include, f'include_file "{os.path.abspath(base)}"'))
    return path


# --------------------------------------------------------------------------
# ports


#: port -> open lock file: held for the life of this process, so that other
#: processes using this allocator (trial -j, a benchmark next to a test run)
#: never get the same ports.
_heldPorts: dict[int, int] = {}
_LOCK_DIR = os.path.join(tempfile.gettempdir(), "dmq-bus-ports")


def _lockPort(port: int) -> bool:
    if port in _heldPorts:
        return False
    os.makedirs(_LOCK_DIR, exist_ok=True)
    fd = os.open(os.path.join(_LOCK_DIR, f"{port}.lock"), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    _heldPorts[port] = fd
    return True


def _unlockPort(port: int) -> None:
    fd = _heldPorts.pop(port, None)
    if fd is not None:
        os.close(fd)


def _portFree(port: int) -> bool:
    """
    Whether both UDP and TCP can bind 127.0.0.1:port right now.
    """
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                return False
    return True


def allocatePorts(n: int, portRange: range = PORT_RANGE) -> list[int]:
    """
    Pick C{n} consecutive ports free for both UDP and TCP on 127.0.0.1.

    The ports are reserved for the rest of this process's life (in this
    process and, through lock files in C{$TMPDIR/dmq-bus-ports}, against
    other processes using this function), so concurrent tests never get the
    same ports. Scanning starts at a random place in C{portRange}.

    @raise KamailioError: no run of C{n} free ports is left in the range.
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    first, last = portRange.start, portRange.stop - n
    if last < first:
        raise ValueError(f"range {portRange} is smaller than {n}")
    span = last - first + 1
    offset = random.randrange(span)
    for i in range(span):
        start = first + (offset + i) % span
        ports = list(range(start, start + n))
        locked: list[int] = []
        for port in ports:
            if not _lockPort(port):
                break
            locked.append(port)
            if not _portFree(port):
                break
        else:
            return ports
        releasePorts(locked)
    raise KamailioError(f"no {n} consecutive free udp+tcp ports in {portRange}")


def releasePorts(ports: Iterable[int]) -> None:
    """
    Give ports from L{allocatePorts} back early (long-running scripts only;
    tests just let the process exit).
    """
    for port in ports:
        _unlockPort(port)


# --------------------------------------------------------------------------
# kamcmd output

KamcmdValue: TypeAlias = "str | dict[str, KamcmdValue] | list[KamcmdValue]"


def _parseBlock(lines: list[str], pos: int) -> tuple[KamcmdValue, int]:
    members: dict[str, KamcmdValue] = {}
    items: list[KamcmdValue] = []
    while pos < len(lines):
        content = lines[pos].lstrip("\t ")
        pos += 1
        if content.strip() == "}":
            if members:
                if items:
                    members[""] = items
                return members, pos
            return items, pos
        if content.strip() == "{":
            value, pos = _parseBlock(lines, pos)
            items.append(value)
        elif ":" in content:
            key, _, rest = content.partition(":")
            rest = rest[1:] if rest.startswith(" ") else rest
            if rest.strip() == "{":
                members[key], pos = _parseBlock(lines, pos)
            else:
                members[key] = rest
        elif content.strip():
            items.append(content)
    raise ValueError("kamcmd output: unterminated '{' block")


def parseKamcmdOutput(text: str) -> list[KamcmdValue]:
    """
    Parse what kamcmd prints for an RPC result.

    kamcmd prints each top-level value on its own: a struct as a C{{ ... }}
    block of tab-indented C{name: value} lines (a nested struct is
    C{name: {} ... C{}}), an array of structs as anonymous C{{ ... }} blocks,
    and a scalar as a bare line. Structs become dicts, blocks holding only
    anonymous values become lists, scalars stay strings (kamcmd does not say
    which were numbers). Values that span lines are not supported.

    @raise ValueError: a block is not closed.
    """
    lines = text.splitlines()
    values: list[KamcmdValue] = []
    pos = 0
    while pos < len(lines):
        content = lines[pos].strip()
        pos += 1
        if content == "{":
            value, pos = _parseBlock(lines, pos)
            values.append(value)
        elif content:
            values.append(content)
    return values


_RPC_ERROR = re.compile(r"^error: (-?\d+) - (.*)$", re.DOTALL)


def _toDMQNode(value: KamcmdValue) -> DMQNode:
    if not isinstance(value, dict):
        raise ValueError(f"dmq.list_nodes: unexpected entry {value!r}")
    return DMQNode(
        host=_field(value, "host"),
        port=int(_field(value, "port")),
        proto=_field(value, "proto"),
        resolved_ip=_field(value, "resolved_ip"),
        status=_field(value, "status"),
        last_notification=int(_field(value, "last_notification")),
        local=_field(value, "local") != "0",
    )


def _field(struct: dict[str, KamcmdValue], name: str) -> str:
    value = struct.get(name)
    if not isinstance(value, str):
        raise ValueError(f"kamcmd output: no scalar {name!r} in {struct!r}")
    return value


# --------------------------------------------------------------------------
# process groups


def _becomeSubreaper() -> None:
    """
    Adopt orphans (Linux PR_SET_CHILD_SUBREAPER), best effort.

    SIGKILLing a node's process group orphans its worker processes. Where
    PID 1 does not reap (some containers and micro-VMs), they would stay
    zombies for good; as a subreaper this process gets them and reaps them.
    """
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def _groupProcesses(pgid: int) -> list[tuple[int, str]]:
    """
    (pid, state) of every process in process group C{pgid}, from /proc.
    """
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parens
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) >= 3 and int(fields[2]) == pgid:
            found.append((int(name), fields[0]))
    return found


def _reapGroup(pgid: int) -> None:
    """
    Reap zombies of group C{pgid} that were reparented to us (see
    L{_becomeSubreaper}).
    """
    while True:
        try:
            pid, _ = os.waitpid(-pgid, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


#: every node that was started and not yet stopped, killed at interpreter exit
_liveNodes: weakref.WeakSet[KamailioNode] = weakref.WeakSet()


@atexit.register
def _killLeftovers() -> None:
    for node in list(_liveNodes):
        node.kill()


# --------------------------------------------------------------------------
# the node


class KamailioNode:
    """
    One real Kamailio DMQ node on udp+tcp 127.0.0.1:C{port}, or with
    C{transport="tls"} on tls 127.0.0.1:C{port} (and udp+tcp on
    L{plainPort}).

    Its state lives in C{baseDir/PORT/}: C{kamailio.pid}, C{kamailio.log}
    (stderr of all its processes), C{kamailio_ctl} (binrpc socket for
    kamcmd) and the jsonrpcs FIFO/socket. The node runs in its own process
    group (setsid), so L{stop} and L{kill} reach all of its processes and
    nothing else. Call L{stop} in a cleanup (it is always safe, also twice,
    also after L{kill} or a failed L{start}); nodes still running when the
    interpreter exits are SIGKILLed.

    @ivar port: the SIP port (UDP and TCP; TLS only for a TLS node).
    @ivar plainPort: the UDP and TCP port: L{port}, except for a TLS node.
    @ivar serverAddress: the dmq server_address it advertises, e.g.
        C{sip:127.0.0.1:25001}, C{sip:127.0.0.1:25001;transport=tcp} or
        C{sip:127.0.0.1:25001;transport=tls}.
    @ivar seedAddress: its dmq notification_address, or None for a first node.
    @ivar dir: its state directory.
    """

    def __init__(
        self,
        port: int,
        seedPort: int | None = None,
        *,
        baseDir: str,
        pingInterval: int = 5,
        frTimer: int = 30000,
        transport: str = "udp",
        seedTransport: str | None = None,
        shmMB: int = 64,
        pkgMB: int = 8,
        extraDefines: Sequence[str] = (),
        tls: TLSFiles | None = None,
        plainPort: int | None = None,
        config: str | None = None,
    ) -> None:
        """
        @param port: SIP port for UDP and TCP on 127.0.0.1.
        @param seedPort: port of the node to join (dmq notification_address
            C{sip:127.0.0.1:SEEDPORT}); None for the first node of a bus.
        @param baseDir: the node's files go to C{baseDir/PORT/}. Keep it
            short: the ctl socket path must fit in 107 bytes, so a trial
            C{mktemp()} is too deep; use C{tempfile.mkdtemp()}.
        @param pingInterval: dmq ping_interval in s (Kamailio clamps to >= 5).
        @param frTimer: tm fr_timer in ms (how long an unanswered KDMQ waits
            for a final reply before tm reports 408 to dmq).
        @param transport: C{"udp"} or C{"tcp"}: the transport of the node's
            DMQ server_address (it listens on both either way); or C{"tls"}:
            DMQ over TLS on C{port} (C{kamailio-tls.cfg}), which needs
            C{tls}.
        @param seedTransport: the transport in the seed's address; defaults
            to C{transport}. It must match how the seed advertises itself,
            or the seed shows up twice in the node list. A TLS node's seed
            is a TLS one, and only a TLS node has a TLS seed.
        @param shmMB: shared memory (C{-m}); bursts of thousands of sets need
            more than 64 (about 9 KB per KDMQ transaction for 5 s).
        @param pkgMB: private memory per process (C{-M}).
        @param extraDefines: more C{-A} defines, e.g. C{("LOG_KDMQ",
            "DEBUG_LEVEL=3")}; string values carry their own double quotes.
        @param tls: for a TLS node, its certificate, key and CA bundle. Its
            tls.cfg (written to the node's directory) uses them for both
            roles, with C{verify_certificate} and C{require_certificate}
            on: a peer must present a certificate chaining to the bundle.
        @param plainPort: a TLS node's UDP and TCP port (the test hooks);
            by default one more port from L{allocatePorts}.
        @param config: the Kamailio config: by default C{kamailio-node.cfg},
            or C{kamailio-tls.cfg} for a TLS node (see L{tlsConfigIncluding}).
        """
        seedTransport = seedTransport or transport
        for t in (transport, seedTransport):
            if t not in ("udp", "tcp", "tls"):
                raise ValueError(f"transport must be 'udp', 'tcp' or 'tls', not {t!r}")
        if (transport == "tls") != (seedTransport == "tls"):
            raise ValueError("a TLS node needs a TLS seed, and a TLS seed a TLS node")
        if (transport == "tls") != (tls is not None):
            raise ValueError("give tls (certificate, key, CA) for a TLS node, and only then")
        self.tls = tls
        if tls is None:
            self.plainPort = port
        else:
            self.plainPort = plainPort if plainPort is not None else allocatePorts(1)[0]
        self.config = config or (CONFIG_PATH if tls is None else TLS_CONFIG_PATH)
        self.port = port
        self.seedPort = seedPort
        self.pingInterval = pingInterval
        self.frTimer = frTimer
        self.transport = transport
        self.shmMB = shmMB
        self.pkgMB = pkgMB
        self.extraDefines = tuple(extraDefines)
        self.serverAddress = self._sipAddress(port, transport)
        self.seedAddress = None if seedPort is None else self._sipAddress(seedPort, seedTransport)
        self.dir = os.path.join(os.path.abspath(baseDir), str(port))
        self.logPath = os.path.join(self.dir, "kamailio.log")
        self.pidPath = os.path.join(self.dir, "kamailio.pid")
        self.ctlPath = os.path.join(self.dir, "kamailio_ctl")
        self.tlsConfigPath = os.path.join(self.dir, "tls.cfg")
        longest = os.path.join(self.dir, "kamailio_rpc.fifo")
        if len(longest.encode()) > _MAX_UNIX_PATH:
            raise ValueError(f"baseDir too long for unix socket paths: {longest}")
        self._process: subprocess.Popen[bytes] | None = None
        self._pgid: int | None = None

    @staticmethod
    def _sipAddress(port: int, transport: str) -> str:
        suffix = "" if transport == "udp" else f";transport={transport}"
        return f"sip:{LOOPBACK}:{port}{suffix}"

    def __repr__(self) -> str:
        return f"<KamailioNode {self.serverAddress} pid={self.pid}>"

    # -- life cycle --------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """
        Pid of the main (attendant) process while started, else None.
        """
        return self._pgid

    def commandLine(self) -> list[str]:
        """
        The kamailio command line (without the session/ulimit wrapper).
        """
        binary = kamailioPath()
        if binary is None:
            raise KamailioError(SKIP_REASON)
        args = [
            binary,
            "-f",
            self.config,
            "-DD",
            "-E",
            "-Y",
            self.dir,
            "-w",
            self.dir,
            "-P",
            self.pidPath,
            "-m",
            str(self.shmMB),
            "-M",
            str(self.pkgMB),
            "-A",
            f"NODE_PORT={self.plainPort}",
            "-A",
            f'DMQ_SERVER="{self.serverAddress}"',
            "-A",
            f'CTL_SOCK="unix:{self.ctlPath}"',
            "-A",
            f"PING_INTERVAL={self.pingInterval}",
            "-A",
            f"FR_TIMER={self.frTimer}",
        ]
        if self.seedAddress is not None:
            args += ["-A", f'DMQ_SEED="{self.seedAddress}"']
        if self.tls is not None:
            args += ["-A", f"TLS_PORT={self.port}", "-A", f'TLS_CONFIG="{self.tlsConfigPath}"']
        for define in self.extraDefines:
            args += ["-A", define]
        return args

    def start(self) -> None:
        """
        Start the node and block until its ctl socket answers C{core.version}.

        @raise KamailioError: kamailio is missing, exited, or did not answer
            within L{START_TIMEOUT} s; the message holds the log's tail. The
            process group is already killed then.
        """
        if self._process is not None:
            raise KamailioError(f"{self!r} already started")
        os.makedirs(self.dir, exist_ok=True)
        for stale in ("kamailio.pid", "kamailio_ctl", "kamailio_rpc.fifo", "kamailio_rpc.sock"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.dir, stale))
        args = self.commandLine()
        if self.tls is not None:
            self._writeTLSConfig(self.tls)
        _becomeSubreaper()
        with open(self.logPath, "ab") as log:
            log.write(f"{time.strftime('%F %T')} start: {' '.join(args)}\n".encode())
            log.flush()
            # start_new_session: setsid() in the child, so pgid == pid and the
            # node's processes can be killed as a group. sh only sets ulimit
            # (no core files of ~75 MB on a crash) and execs kamailio.
            self._process = subprocess.Popen(
                ["/bin/sh", "-c", 'ulimit -c 0; exec "$@"', "kamailio", *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                close_fds=True,
            )
        self._pgid = self._process.pid
        _liveNodes.add(self)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._process.poll() is not None:
                rc = self._process.returncode
                self.kill()
                raise KamailioError(
                    f"kamailio on port {self.port} exited with {rc} while starting; "
                    f"log {self.logPath}:\n{self.logTail()}"
                )
            if os.path.exists(self.ctlPath):
                with contextlib.suppress(KamailioError):
                    self.rpc("core.version", timeout=1.0)
                    return
            if time.monotonic() > deadline:
                self.kill()
                raise KamailioError(
                    f"kamailio on port {self.port} did not answer core.version within "
                    f"{START_TIMEOUT:g} s; log {self.logPath}:\n{self.logTail()}"
                )
            time.sleep(0.05)

    def _writeTLSConfig(self, files: TLSFiles) -> None:
        """
        The node's tls.cfg: the same certificate, key and CA bundle whether
        it accepts a connection (server) or opens one (client), and in both
        roles the peer must present a certificate the bundle verifies.
        """
        profile = "\n".join(
            (
                "method = TLSv1.2+",
                "verify_certificate = yes",
                "require_certificate = yes",
                f"certificate = {os.path.abspath(files.certificate)}",
                f"private_key = {os.path.abspath(files.key)}",
                f"ca_list = {os.path.abspath(files.ca)}",
            )
        )
        with open(self.tlsConfigPath, "w") as f:
            f.write(f"[server:default]\n{profile}\n\n[client:default]\n{profile}\n")

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """
        Stop the node: SIGTERM (Kamailio sends nothing on the wire for it),
        wait up to C{timeout} s, then SIGKILL the process group; block until
        no process of the group is left. A no-op when not running, so it is
        always safe to call, also twice.
        """
        process = self._process
        if process is None:
            return
        deadline = time.monotonic() + timeout
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout)
        # the main process may exit before its children finish shutting down
        while self._liveGroupPids(process.pid) and time.monotonic() < deadline:
            _reapGroup(process.pid)
            time.sleep(0.02)
        self._finish(process)

    def kill(self) -> None:
        """
        Crash the node: SIGKILL its whole process group at once, then block
        until no process of the group is left. Safe to call at any time.
        """
        process = self._process
        if process is None:
            return
        self._finish(process)

    def _finish(self, process: subprocess.Popen[bytes]) -> None:
        pgid = process.pid
        deadline = time.monotonic() + 5.0
        while True:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(0.5)
            _reapGroup(pgid)
            if process.returncode is not None and not self._liveGroupPids(pgid):
                break
            if time.monotonic() > deadline:
                raise KamailioError(f"processes of group {pgid} survive SIGKILL")
            time.sleep(0.02)
        self._process = None
        self._pgid = None
        _liveNodes.discard(self)

    @staticmethod
    def _liveGroupPids(pgid: int) -> list[int]:
        return [pid for pid, state in _groupProcesses(pgid) if state not in ("Z", "X")]

    def livePids(self, pgid: int | None = None) -> list[int]:
        """
        Pids of running (non-zombie) processes in the node's process group,
        or in group C{pgid} if given (e.g. a former L{pid} after L{kill}).
        """
        group = self._pgid if pgid is None else pgid
        return [] if group is None else self._liveGroupPids(group)

    @property
    def running(self) -> bool:
        """
        Whether the node was started and its main process is still alive.
        """
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> KamailioNode:
        self.start()
        return self

    def __exit__(
        self,
        excType: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- log ---------------------------------------------------------------

    def log(self) -> str:
        """
        The node's log (stderr of all its processes), "" if there is none.
        """
        try:
            with open(self.logPath, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def logTail(self, lines: int = 20) -> str:
        """
        The last C{lines} lines of L{log}.
        """
        return "\n".join(self.log().splitlines()[-lines:])

    # -- RPC ---------------------------------------------------------------

    def rpc(self, method: str, *args: str | int, timeout: float = RPC_TIMEOUT) -> str:
        """
        Run one RPC through kamcmd on the node's ctl socket; kamcmd's output.

        kamcmd's argument rules apply: an argument that looks like a number
        is sent as a number; prefix a string with C{s:} to keep it a string.

        @raise KamailioRPCError: the RPC answered C{error: CODE - MESSAGE},
            or kamcmd failed (node down: C{code} is None).
        @raise KamailioError: kamcmd is missing or did not finish in time.
        """
        kamcmd = kamcmdPath()
        if kamcmd is None:
            raise KamailioError(SKIP_REASON)
        # "--": arguments such as -5 are not kamcmd options
        command = [kamcmd, "-s", f"unix:{self.ctlPath}", "--", method, *map(str, args)]
        try:
            result = subprocess.run(
                command, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired as e:
            raise KamailioError(f"kamcmd {method} on port {self.port}: no answer") from e
        out = result.stdout.decode("utf-8", "replace")
        if result.returncode != 0:
            err = result.stderr.decode("utf-8", "replace").strip()
            raise KamailioRPCError(method, None, err or f"exit status {result.returncode}")
        # kamcmd exits 0 on RPC errors too
        match = _RPC_ERROR.match(out.strip())
        if match:
            raise KamailioRPCError(method, int(match.group(1)), match.group(2))
        return out

    def listNodes(self) -> list[DMQNode]:
        """
        C{dmq.list_nodes}: the node's DMQ view, itself included (C{local}).

        kamcmd prints one block per node, in list order (newest first),
        the inner lines indented with one tab::

            {
                host: 127.0.0.1
                port: 25001
                proto: *
                resolved_ip: 127.0.0.1
                status: active
                last_notification: 0
                local: 0
            }
        """
        return [_toDMQNode(v) for v in parseKamcmdOutput(self.rpc("dmq.list_nodes"))]

    def nodeStatuses(self) -> dict[int, str]:
        """
        Port -> status of every node in L{listNodes} (the node itself included).
        """
        return {n["port"]: n["status"] for n in self.listNodes()}

    # -- htable ------------------------------------------------------------

    def htGet(self, key: str, table: str = "kv") -> str | int | None:
        """
        C{htable.get}: the value (str, or int for an integer cell), or None
        if the key is not in the table.
        """
        try:
            out = self.rpc("htable.get", f"s:{table}", f"s:{key}")
        except KamailioRPCError as e:
            if e.code == 500 and "doesn't exist" in e.message:
                return None
            raise
        [result] = parseKamcmdOutput(out)
        if not isinstance(result, dict) or not isinstance(result.get("item"), dict):
            raise ValueError(f"htable.get: unexpected answer {out!r}")
        item = result["item"]
        assert isinstance(item, dict)
        value = _field(item, "value")
        # flags: AVP_VAL_STR (2) is set for a string cell, clear for an int
        return value if int(_field(item, "flags")) & 2 else int(value)

    def htSets(self, key: str, value: str, table: str = "kv") -> None:
        """
        C{htable.sets}: store a string (replicated to the other DMQ nodes).
        """
        self.rpc("htable.sets", f"s:{table}", f"s:{key}", f"s:{value}")

    def htSeti(self, key: str, value: int, table: str = "kv") -> None:
        """
        C{htable.seti}: store an integer (replicated to the other DMQ nodes).
        """
        self.rpc("htable.seti", f"s:{table}", f"s:{key}", int(value))

    def htDelete(self, key: str, table: str = "kv") -> bool:
        """
        C{htable.delete} (replicated): True if the key was there, False if not.
        """
        try:
            self.rpc("htable.delete", f"s:{table}", f"s:{key}")
        except KamailioRPCError as e:
            if e.code == 404:
                return False
            raise
        return True

    def htDump(self, table: str = "kv") -> dict[str, str | int]:
        """
        C{htable.dump}: the whole table as key -> value (int for int cells).
        """
        cells: dict[str, str | int] = {}
        for entry in parseKamcmdOutput(self.rpc("htable.dump", f"s:{table}")):
            slot = entry.get("slot", []) if isinstance(entry, dict) else []
            for item in slot if isinstance(slot, list) else [slot]:
                if isinstance(item, dict):
                    value = _field(item, "value")
                    intCell = _field(item, "type") == "int"
                    cells[_field(item, "name")] = int(value) if intCell else value
        return cells


# --------------------------------------------------------------------------
# polling


def _defaultClock() -> IReactorTime:
    from twisted.internet import reactor

    return reactor  # type: ignore[return-value]


def waitFor(
    predicate: Callable[[], bool],
    timeout: float = 10.0,
    interval: float = 0.05,
    *,
    clock: IReactorTime | None = None,
    description: str | None = None,
) -> Deferred[None]:
    """
    Poll C{predicate} every C{interval} s on the reactor clock (trial
    C{TestCase} with the real reactor) until it returns true.

    The predicate is called synchronously (a kamcmd call is fine). An
    exception from it fails the Deferred.

    @return: a Deferred that fires with None once the predicate is true, or
        fails with L{WaitTimeout} after C{timeout} s.
    """
    theClock = _defaultClock() if clock is None else clock
    start = theClock.seconds()
    what = description or getattr(predicate, "__name__", repr(predicate))

    async def poll() -> None:
        while not predicate():
            if theClock.seconds() - start >= timeout:
                raise WaitTimeout(f"{what}: still false after {timeout:g} s")
            await deferLater(theClock, interval, lambda: None)

    return Deferred.fromCoroutine(poll())


def waitUntil(
    predicate: Callable[[], bool],
    timeout: float = 10.0,
    interval: float = 0.05,
    *,
    description: str | None = None,
) -> None:
    """
    Blocking L{waitFor} for scripts: poll C{predicate} every C{interval} s
    until it returns true.

    @raise WaitTimeout: still false after C{timeout} s.
    """
    what = description or getattr(predicate, "__name__", repr(predicate))
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"{what}: still false after {timeout:g} s")
        time.sleep(interval)


def bothActive(service: Any, node: KamailioNode) -> bool:
    """
    Whether the dmq-bus C{service} (a L{dmq_bus.service.DMQService}) lists
    Kamailio C{node} active, and C{node} lists the service active.
    """
    ours = service.config.bus.serverAddress.defaultedPort
    theirs = [n for n in service.bus.nodes() if n.uri.port == node.port]
    return (
        bool(theirs)
        and theirs[0].status.word == "active"
        and node.nodeStatuses().get(ours) == "active"
    )
