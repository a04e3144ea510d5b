"""
Faults with real dmq-bus node processes on 127.0.0.1 (see L{bench.common}):

  1. kill -9 of a node while another writes, then restart on the same port:
     afterwards every survivor holds every key, and so does the restarted
     node (join sync plus heal re-sync);
  2. SIGSTOP of a node for longer than failure detection, then SIGCONT:
     the others mark it, remove it (it stays stopped until then), then
     list it again, and keys written on both sides meanwhile reach
     everybody.

A partition is not run here: a clean 3/2 split of real processes needs
one address per node and a switch to cut, which bench/partition.py builds
with network namespaces and two bridges (as root). It partitions a 5-node
bus 3/2 twice and heals it; the in-memory tests (tests/test_faults.py)
cover the same on one clock.

Bounded: every wait has a deadline; every process is stopped at the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import BenchError, BusNode, allocatePorts, releasePorts, waitFor

NODES = 4
KEYS = 20_000
WAIT = 60.0
"""Longest wait for any one condition, in seconds."""


def killAndRestart(ports: list[int], logDir: str) -> None:
    nodes = [BusNode(ports[0], logDir=logDir).start()]
    nodes += [BusNode(p, ports[0], logDir=logDir).start() for p in ports[1:]]
    try:
        waitFor(lambda: all(n.activeNodes() == NODES - 1 for n in nodes), WAIT, "bus formed", 0.2)
        writer, victim = nodes[0], nodes[2]
        started = time.monotonic()
        writer.send(f"write k {KEYS} 20 100")
        time.sleep(0.3)
        assert victim.process is not None
        os.killpg(victim.process.pid, signal.SIGKILL)
        victim.process.wait()
        victim.process = None
        killedAt = time.monotonic() - started
        restarted = BusNode(ports[2], ports[0], logDir=logDir).start()
        nodes[2] = restarted
        restartedAt = time.monotonic() - started
        writer.expect("written", WAIT)
        wroteAt = time.monotonic() - started
        waitFor(lambda: all(n.count() == KEYS for n in nodes), WAIT, "every key everywhere", 0.2)
        doneAt = time.monotonic() - started
        counts = [n.count() for n in nodes]
        print(
            f"kill -9 + restart under write load: {KEYS} keys written by node 1; "
            f"node 3 killed at {killedAt:.2f} s, restarted (ready) at {restartedAt:.2f} s; "
            f"writes done at {wroteAt:.2f} s; every node holds every key at {doneAt:.2f} s"
        )
        print(f"  keys per node: {counts}")
        stats = restarted.stats()
        print(
            "  restarted node: sync chunks received "
            f"{stats.get('htable.sync.chunks_received', 0)}, "
            f"cells applied {stats.get('htable.sync.cells_applied', 0)}; "
            "survivors' re-sync requests: "
            f"{[n.stats().get('htable.resync.requests_sent', 0) for n in nodes if n is not restarted]}"
        )
    finally:
        for node in nodes:
            node.stop()


def stopAndContinue(ports: list[int], logDir: str) -> None:
    nodes = [BusNode(ports[0], logDir=logDir).start()]
    nodes += [BusNode(p, ports[0], logDir=logDir).start() for p in ports[1:]]
    try:
        waitFor(lambda: all(n.activeNodes() == NODES - 1 for n in nodes), WAIT, "bus formed", 0.2)
        stopped, others = nodes[2], [n for i, n in enumerate(nodes) if i != 2]
        started = time.monotonic()
        os.killpg(stopped.pid, signal.SIGSTOP)
        try:
            waitFor(
                lambda: all(n.activeNodes() == NODES - 2 for n in others),
                WAIT,
                "stopped node disabled",
                0.2,
            )
            disabledAt = time.monotonic() - started
            others[0].call("write away 500 50 100", "written", WAIT)
            stoppedURI = f"sip:127.0.0.1:{stopped.port}"
            waitFor(
                lambda: all(
                    stoppedURI not in {entry["uri"] for entry in n.nodes()} for n in others
                ),
                WAIT,
                "stopped node removed",
                0.2,
            )
            removedAt = time.monotonic() - started
        finally:
            os.killpg(stopped.pid, signal.SIGCONT)
        contAt = time.monotonic() - started
        stopped.call("write mine 300 50 100", "written", WAIT)
        waitFor(lambda: all(n.activeNodes() == NODES - 1 for n in nodes), WAIT, "listed again", 0.2)
        backAt = time.monotonic() - started
        waitFor(lambda: all(n.count() == 800 for n in nodes), WAIT, "keys everywhere", 0.2)
        syncedAt = time.monotonic() - started
        print(
            f"SIGSTOP + SIGCONT: node 3 stopped at 0 s; no longer active on the others at "
            f"{disabledAt:.2f} s; removed from every list at {removedAt:.2f} s; "
            f"SIGCONT at {contAt:.2f} s; active everywhere again at "
            f"{backAt:.2f} s; 500 keys written while it was stopped + 300 it wrote on "
            f"resuming present on all {NODES} nodes at {syncedAt:.2f} s"
        )
        print(f"  keys per node: {[n.count() for n in nodes]}")
        print(
            "  re-sync requests sent per node: "
            f"{[n.stats().get('htable.resync.requests_sent', 0) for n in nodes]}"
        )
    finally:
        for node in nodes:
            node.stop()


def main() -> int:
    logDir = tempfile.mkdtemp(prefix="dmqb-faults-")
    ports = allocatePorts(NODES)
    try:
        killAndRestart(ports, logDir)
        stopAndContinue(ports, logDir)
        print("partition: skipped here, run bench/partition.py (as root)")
    except BenchError as e:
        print(f"FAILED: {e}")
        return 1
    finally:
        releasePorts(ports)
        shutil.rmtree(logDir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
