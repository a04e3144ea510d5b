"""
Tests for the real-Kamailio harness in L{tests.interop.kamailio}.

L{KamailioClusterTests} runs real Kamailio 5.6.3 processes on 127.0.0.1 (and
is skipped loudly when Kamailio is not installed); the other classes check the
harness's own parsing, port allocation and polling without any Kamailio.
"""

# Twisted's assert* methods carry no annotations: calling them is fine here.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import shutil
import socket
import tempfile
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from .kamailio import (
    LOOPBACK,
    PORT_RANGE,
    SKIP_REASON,
    KamailioError,
    KamailioNode,
    WaitTimeout,
    allocatePorts,
    kamailioAvailable,
    parseKamcmdOutput,
    waitFor,
    waitUntil,
)

# What kamcmd 5.6.3 printed for dmq.list_nodes on the second of two nodes
# (the second one with a ;transport=tcp server_address), verbatim.
LIST_NODES_OUTPUT = (
    "{\n"
    "\thost: 127.0.0.1\n"
    "\tport: 25900\n"
    "\tproto: *\n"
    "\tresolved_ip: 127.0.0.1\n"
    "\tstatus: active\n"
    "\tlast_notification: 0\n"
    "\tlocal: 0\n"
    "}\n"
    "{\n"
    "\thost: 127.0.0.1\n"
    "\tport: 25901\n"
    "\tproto: tcp\n"
    "\tresolved_ip: 127.0.0.1\n"
    "\tstatus: active\n"
    "\tlast_notification: 0\n"
    "\tlocal: 1\n"
    "}\n"
)

# What kamcmd 5.6.3 printed for htable.dump with one string and one int cell.
HT_DUMP_OUTPUT = (
    "{\n"
    "\tentry: 304\n"
    "\tsize: 1\n"
    "\tslot: {\n"
    "\t\t{\n"
    "\t\t\tname: sp\n"
    "\t\t\tvalue: hello world\n"
    "\t\t\ttype: str\n"
    "\t\t}\n"
    "\t}\n"
    "}\n"
    "{\n"
    "\tentry: 386\n"
    "\tsize: 1\n"
    "\tslot: {\n"
    "\t\t{\n"
    "\t\t\tname: count\n"
    "\t\t\tvalue: 42\n"
    "\t\t\ttype: int\n"
    "\t\t}\n"
    "\t}\n"
    "}\n"
)


def _portsBindable(ports: list[int]) -> bool:
    """
    Whether UDP and TCP can both bind 127.0.0.1 on every port.
    """
    for port in ports:
        for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
            with socket.socket(socket.AF_INET, kind) as sock:
                try:
                    sock.bind((LOOPBACK, port))
                except OSError:
                    return False
    return True


class KamcmdOutputTests(SynchronousTestCase):
    """
    The parser reads kamcmd's text output as Kamailio 5.6.3 prints it.
    """

    def test_listNodesBlocks(self) -> None:
        """
        Each C{dmq.list_nodes} block becomes one dict of its fields.
        """
        parsed = parseKamcmdOutput(LIST_NODES_OUTPUT)
        self.assertEqual(len(parsed), 2)
        self.assertEqual(
            parsed[1],
            {
                "host": "127.0.0.1",
                "port": "25901",
                "proto": "tcp",
                "resolved_ip": "127.0.0.1",
                "status": "active",
                "last_notification": "0",
                "local": "1",
            },
        )

    def test_nestedAnonymousBlocks(self) -> None:
        """
        An C{htable.dump} slot (a struct member holding anonymous structs)
        becomes a list of dicts, and an empty value stays an empty string.
        """
        parsed = parseKamcmdOutput(HT_DUMP_OUTPUT + "{\n\titem: {\n\t\tvalue: \n\t}\n}\n")
        self.assertEqual(
            parsed[0],
            {
                "entry": "304",
                "size": "1",
                "slot": [{"name": "sp", "value": "hello world", "type": "str"}],
            },
        )
        self.assertEqual(parsed[2], {"item": {"value": ""}})

    def test_scalarLines(self) -> None:
        """
        Bare lines (C{core.version}, C{Ok. Key set to new value.}) are strings.
        """
        self.assertEqual(
            parseKamcmdOutput("kamailio 5.6.3 (x86_64/linux) \n"),
            ["kamailio 5.6.3 (x86_64/linux)"],
        )

    def test_unterminatedBlock(self) -> None:
        """
        Truncated output is an error, not a silently short result.
        """
        self.assertRaises(ValueError, parseKamcmdOutput, "{\n\thost: 127.0.0.1\n")


class AllocatePortsTests(SynchronousTestCase):
    """
    L{allocatePorts} hands out consecutive free loopback ports, never twice.
    """

    def test_consecutiveFreeAndDistinct(self) -> None:
        """
        Two allocations give consecutive, bindable ports in the project range
        that do not overlap.
        """
        first = allocatePorts(3)
        second = allocatePorts(3)
        for ports in (first, second):
            self.assertEqual(ports, list(range(ports[0], ports[0] + 3)))
            self.assertTrue(all(p in PORT_RANGE for p in ports))
            self.assertTrue(_portsBindable(ports))
        self.assertFalse(set(first) & set(second))

    def test_busyPortSkipped(self) -> None:
        """
        A port that something already listens on (UDP only) is never handed
        out.
        """
        small = range(PORT_RANGE.start, PORT_RANGE.start + 50)
        busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(busy.close)
        try:
            busy.bind((LOOPBACK, 0))
        except OSError:
            self.skipTest("cannot bind a loopback UDP socket")
        busyPort = busy.getsockname()[1]
        busyRange = range(busyPort, busyPort + 1)
        self.assertRaises(KamailioError, allocatePorts, 1, busyRange)
        self.assertNotIn(busyPort, allocatePorts(1, small))


class WaitTests(SynchronousTestCase):
    """
    The polling helpers stop when the condition holds or time runs out.
    """

    def test_waitForFiresWhenTrue(self) -> None:
        """
        L{waitFor} polls on the given clock and fires once the predicate is
        true.
        """
        clock = Clock()
        calls: list[int] = []

        def ready() -> bool:
            calls.append(1)
            return len(calls) >= 3

        d = waitFor(ready, timeout=5, interval=0.5, clock=clock)
        self.assertNoResult(d)
        clock.advance(0.5)
        self.assertNoResult(d)
        clock.advance(0.5)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(len(calls), 3)

    def test_waitForTimesOut(self) -> None:
        """
        L{waitFor} fails with L{WaitTimeout} when the predicate stays false.
        """
        clock = Clock()
        d: Deferred[None] = waitFor(lambda: False, timeout=1, interval=0.25, clock=clock)
        clock.pump([0.25] * 4)
        self.failureResultOf(d, WaitTimeout)

    def test_waitUntilTimesOut(self) -> None:
        """
        L{waitUntil} raises L{WaitTimeout} when the predicate stays false.
        """
        self.assertRaises(WaitTimeout, waitUntil, lambda: False, 0.05, 0.01)


class KamailioClusterTests(TestCase):
    """
    The harness runs real Kamailio 5.6.3 DMQ nodes on 127.0.0.1: they join,
    replicate the htable C{kv}, and leave no process behind.
    """

    skip = None if kamailioAvailable() else SKIP_REASON

    def setUp(self) -> None:
        # short base dir: unix socket paths must fit in 107 bytes
        self.baseDir = tempfile.mkdtemp(prefix="dmqk-")
        self.addCleanup(shutil.rmtree, self.baseDir, True)

    def node(self, port: int, seedPort: int | None = None, **kwargs: Any) -> KamailioNode:
        """
        A started node whose process group is stopped (SIGKILL at the latest)
        when the test ends, whether it passed or not.
        """
        node = KamailioNode(port, seedPort, baseDir=self.baseDir, **kwargs)
        # registered before start(): a failed start is cleaned up too
        self.addCleanup(node.stop)
        node.start()
        return node

    def cluster(self, n: int, **kwargs: Any) -> list[KamailioNode]:
        """
        C{n} started nodes on fresh ports, each seeded with the first.
        """
        ports = allocatePorts(n)
        first = self.node(ports[0], **kwargs)
        return [first] + [self.node(port, ports[0], **kwargs) for port in ports[1:]]

    def allActive(self, nodes: list[KamailioNode]) -> bool:
        """
        Whether every node lists exactly C{nodes}, all C{active}.
        """
        ports = {n.port: "active" for n in nodes}
        return all(n.nodeStatuses() == ports for n in nodes)

    def test_seededNodesListEachOtherActive(self) -> Deferred[None]:
        """
        Two nodes, the second seeded with the first, both list both nodes as
        C{active} within 5 s, each marking only itself C{local}.
        """
        nodes = self.cluster(2)

        def check(_: None) -> None:
            for node in nodes:
                listed = node.listNodes()
                self.assertEqual(
                    {(e["host"], e["port"], e["proto"], e["local"]) for e in listed},
                    {(LOOPBACK, n.port, "*", n is node) for n in nodes},
                )

        d = waitFor(lambda: self.allActive(nodes), timeout=5, description="both active")
        return d.addCallback(check)

    def test_tcpServerAddress(self) -> Deferred[None]:
        """
        Nodes told to use TCP advertise C{;transport=tcp} and are listed with
        proto C{tcp}, all active.
        """
        nodes = self.cluster(2, transport="tcp")
        self.assertEqual(nodes[0].serverAddress, f"sip:{LOOPBACK}:{nodes[0].port};transport=tcp")

        def check(_: None) -> None:
            self.assertEqual({e["proto"] for e in nodes[1].listNodes()}, {"tcp"})

        d = waitFor(lambda: self.allActive(nodes), timeout=5, description="both active")
        return d.addCallback(check)

    def test_htableReplicates(self) -> Deferred[None]:
        """
        A string set, an int set and a delete made on one node are seen on
        the other through DMQ replication.
        """
        one, two = nodes = self.cluster(2)

        def setOnOne(_: None) -> Deferred[None]:
            one.htSets("color", "blue sky")
            one.htSeti("count", -5)
            return waitFor(lambda: two.htDump() == {"color": "blue sky", "count": -5}, 5)

        def deleteOnTwo(_: None) -> Deferred[None]:
            self.assertEqual(two.htGet("color"), "blue sky")
            self.assertEqual(two.htGet("count"), -5)
            self.assertTrue(two.htDelete("color"))
            return waitFor(lambda: one.htGet("color") is None, 5)

        d = waitFor(lambda: self.allActive(nodes), timeout=5, description="both active")
        d.addCallback(setOnOne)
        d.addCallback(deleteOnTwo)
        return d

    def test_killLeavesNothing(self) -> None:
        """
        After C{kill()} no process of the node's group is running and its
        ports are free again; C{stop()} and C{kill()} afterwards are no-ops.
        """
        [port] = allocatePorts(1)
        node = self.node(port)
        pgid = node.pid
        assert pgid is not None
        self.assertTrue(node.livePids())
        node.kill()
        self.assertEqual(node.livePids(pgid), [])
        self.assertFalse(node.running)
        self.assertTrue(_portsBindable([port]))
        node.stop()
        node.kill()

    def test_stopTwice(self) -> None:
        """
        C{stop()} ends every process of the node; a second C{stop()}, and a
        C{stop()} on a node never started, do nothing.
        """
        [port] = allocatePorts(1)
        node = self.node(port)
        pgid = node.pid
        assert pgid is not None
        node.stop()
        self.assertEqual(node.livePids(pgid), [])
        node.stop()
        KamailioNode(port, baseDir=self.baseDir).stop()

    def test_startFailureShowsLog(self) -> None:
        """
        A node that cannot bind its port fails C{start()} with the log tail
        in the error, and leaves no process behind.
        """
        [port] = allocatePorts(1)
        blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(blocker.close)
        blocker.bind((LOOPBACK, port))
        node = KamailioNode(port, baseDir=self.baseDir)
        self.addCleanup(node.stop)
        error = self.assertRaises(KamailioError, node.start)
        self.assertIn(node.logPath, str(error))
        self.assertIn("bind", str(error).lower())
        self.assertFalse(node.running)
