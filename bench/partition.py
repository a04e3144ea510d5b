"""
A 3/2 partition of a 5-node bus of real dmq-bus node processes, and its
heal, twice on the same processes (issue 6, point 3).

    python bench/partition.py                   # as root; 2,000 + 500 keys per round
    python bench/partition.py --majority-keys 10000 --minority-keys 2000

The script re-executes itself under C{unshare --net --mount}: a private
network namespace and a private mount namespace (with a tmpfs on
/run/netns, so C{ip netns add} leaves nothing on the host). Everything it
creates lives there and goes away with it. Inside: two bridges C{br0} and
C{br1}, and five namespaces C{dmqp1..5}, each with C{eth0} at
10.213.0.N/24 (a veth pair whose other end, C{dmqvN}, is a port of
C{br0}). Node N runs in namespace N
(C{ip netns exec dmqpN python bench/common.py node --host 10.213.0.N
--port 5060 ...}) with the defaults of L{BusConfig}; node 1 is every
node's seed. A partition moves the bridge ends of two nodes from C{br0} to
C{br1}: the two sides can no longer reach each other, each side still can
reach itself. Healing moves them back.

Round 1: nodes 4 and 5 are cut off (the seed is in the majority). Round 2,
on the same processes after round 1 healed: nodes 1 and 2 are cut off (the
seed is in the minority). Round 2 checks repeatability (what round 1 left
behind: removed-node holds, the re-sync rate limit, a key written before)
and the path where the three nodes of the larger side have lost their seed.

Each round:
  1. partition; time until every node of each side lists exactly the
     nodes of its side as active (each side's lists printed), then until
     the nodes of the other side are gone from the lists (a seed stays,
     pending);
  2. write N keys on a node of the majority and M keys on a node of the
     minority, and the key C{conflict} with a different value on each side;
     wait until each side holds its own keys;
  3. heal; time until every node lists the five nodes, all active, and
     nothing else; then watch the lists for two ping periods
     (L{BusConfig.pingInterval}): any entry that is not one of the five
     nodes, or not active, is a ghost, and there must be none;
  4. time until every node holds every key of both sides, then the same
     value of C{conflict} (looked at from the heal on, alongside the
     lists), and check that value against the documented conflict rule
     (L{syncWinner}: the greater value stays); print the counters of the
     heal (knocks, re-sync requests and retries).

Times are measured from the moment the bridge ports were moved, by polling
the nodes over their pipes (every 0.1 s, plus the time of one look at all
five: figures are about ±0.15 s, and noisy on a loaded machine). Every
wait has a deadline; on failure the script prints what it saw and exits 1.
It exits 2 when it cannot run (not root, no C{ip}, C{unshare} or
C{mount}).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.common import BenchError, BusNode, waitFor  # noqa: E402
from dmq_bus.bus.dispatch import BusConfig  # noqa: E402
from dmq_bus.peers.htable import syncWinner  # noqa: E402
from dmq_bus.sip.uri import SIPURI  # noqa: E402

NETNS_MARK = "DMQ_PARTITION_HOST_MNTNS"
"""Set in the environment of the re-executed script: the host's mount namespace."""

NODES = 5
SUBNET = "10.213.0"
PORT = 5060
SEED = 1
NETNS_DIR = "/run/netns"

DEFAULTS = BusConfig(serverAddress=SIPURI.parse(f"sip:{SUBNET}.1:{PORT}"))
PING = DEFAULTS.pingInterval
HOLD = DEFAULTS.removedHold
POLL = 0.1
"""Seconds between two looks at the nodes."""

WAIT = 60.0
"""Longest wait for a bus to form, a side to settle, writes or keys, in seconds."""

HEAL_WAIT = HOLD + 10 * PING
"""Longest wait for the lists to reconverge after a heal (the removed-node hold is the longest gossip wait)."""

CONFLICT = "conflict"


def address(i: int) -> str:
    return f"{SUBNET}.{i}"


def uri(i: int) -> str:
    return f"sip:{address(i)}:{PORT}"


def run(*command: str) -> None:
    """Run one C{ip} command; L{BenchError} with its stderr when it fails."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise BenchError(f"{' '.join(command)}: {done.stderr.strip() or done.returncode}")


# ---------------------------------------------------------------------------
# the network


class Network:
    """Two bridges and five namespaces, each a veth pair away from C{br0}."""

    def __init__(self) -> None:
        self.namespaces: list[str] = []

    def build(self) -> None:
        for bridge in ("br0", "br1"):
            run("ip", "link", "add", bridge, "type", "bridge")
            run("ip", "link", "set", bridge, "up")
        for i in range(1, NODES + 1):
            ns = f"dmqp{i}"
            run("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            run(
                "ip", "link", "add", f"dmqv{i}", "type", "veth", "peer", "name", "eth0", "netns", ns
            )
            run("ip", "link", "set", f"dmqv{i}", "master", "br0")
            run("ip", "link", "set", f"dmqv{i}", "up")
            run("ip", "-n", ns, "addr", "add", f"{address(i)}/24", "dev", "eth0")
            run("ip", "-n", ns, "link", "set", "eth0", "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")

    def move(self, nodes: Sequence[int], bridge: str) -> float:
        """Move the bridge ends of C{nodes} to C{bridge}; the monotonic time when done."""
        for i in nodes:
            run("ip", "link", "set", f"dmqv{i}", "nomaster")
            run("ip", "link", "set", f"dmqv{i}", "master", bridge)
        return time.monotonic()

    def destroy(self) -> None:
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
        for bridge in ("br0", "br1"):
            subprocess.run(["ip", "link", "delete", bridge], capture_output=True)
        self.namespaces.clear()


# ---------------------------------------------------------------------------
# what the nodes list


Lists = dict[int, list[dict[str, Any]]]


def lists(nodes: dict[int, BusNode]) -> Lists:
    return {i: node.nodes() for i, node in nodes.items()}


def others(entries: list[dict[str, Any]]) -> dict[str, str]:
    """URI -> status of every non-local entry."""
    return {e["uri"]: e["status"] for e in entries if not e["local"]}


def activeSet(entries: list[dict[str, Any]]) -> set[str]:
    return {u for u, status in others(entries).items() if status == "active"}


def short(u: str) -> str:
    """C{sip:10.213.0.4:5060} -> C{n4}; anything else as it is."""
    prefix, suffix = f"sip:{SUBNET}.", f":{PORT}"
    if u.startswith(prefix) and u.endswith(suffix):
        return "n" + u[len(prefix) : -len(suffix)]
    return u


def describe(seen: Lists) -> str:
    rows = []
    for i, entries in sorted(seen.items()):
        listed = ", ".join(f"{short(u)} {s}" for u, s in sorted(others(entries).items()))
        rows.append(f"    n{i} lists: {listed or '(nobody)'}")
    return "\n".join(rows)


def ghosts(entries: list[dict[str, Any]], i: int) -> list[str]:
    """Entries of node C{i}'s list that are not one of the other live nodes, active."""
    expected = {uri(j) for j in range(1, NODES + 1) if j != i}
    found = others(entries)
    bad = [f"{u} {s}" for u, s in found.items() if u not in expected or s != "active"]
    bad += [f"{u} missing" for u in expected - set(found)]
    return bad


def wait(
    predicate: Callable[[], bool], timeout: float, what: str, seen: Callable[[], str]
) -> float:
    """
    Poll C{predicate()} every L{POLL} s; the monotonic time it held.

    @raise BenchError: not within C{timeout} s; the message has C{seen()}.
    """
    try:
        return waitFor(predicate, timeout, what, POLL)
    except BenchError as e:
        raise BenchError(f"{e}; seen:\n{seen()}") from None


def waitEach(
    bus: Bus, good: Callable[[int, list[dict[str, Any]]], bool], timeout: float, what: str
) -> tuple[float, dict[int, float]]:
    """
    Wait until C{good(i, entries)} holds for every node's list at one look.
    Returns the monotonic time it held, and per node the monotonic time
    since which its list has been good without a break.
    """
    since: dict[int, float] = {}

    def done() -> bool:
        now = time.monotonic()
        for i, entries in bus.look().items():
            if good(i, entries):
                since.setdefault(i, now)
            else:
                since.pop(i, None)
        return len(since) == NODES

    at = wait(done, timeout, what, bus.seen)
    return at, since


# ---------------------------------------------------------------------------
# the rounds


class Bus:
    def __init__(self, logDir: str) -> None:
        self.logDir = logDir
        self.nodes: dict[int, BusNode] = {}
        self.last: Lists = {}
        self.keys = 0
        """Keys every node should hold (after a heal)."""
        self.onLook: list[Callable[[], None]] = []
        """Called after each look at the lists."""

    def start(self) -> None:
        for i in range(1, NODES + 1):
            node = BusNode(
                PORT,
                None if i == SEED else PORT,
                logDir=self.logDir,
                host=address(i),
                seedHost=address(SEED),
                prefix=["ip", "netns", "exec", f"dmqp{i}"],
            )
            self.nodes[i] = node
            node.start()

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()

    def look(self) -> Lists:
        self.last = lists(self.nodes)
        for hook in self.onLook:
            hook()
        return self.last

    def seen(self) -> str:
        return describe(self.last)

    def counts(self) -> dict[int, int]:
        return {i: n.count() for i, n in self.nodes.items()}


class KeyWatch:
    """When every node first held every key, then also one value of C{conflict}."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.allKeysAt: float | None = None
        self.sameAt: float | None = None

    def look(self) -> None:
        if self.sameAt is not None:
            return
        if any(n.count() != self.bus.keys for n in self.bus.nodes.values()):
            return
        now = time.monotonic()
        if self.allKeysAt is None:
            self.allKeysAt = now
        if len({repr(n.get(CONFLICT)) for n in self.bus.nodes.values()}) == 1:
            self.sameAt = now

    def done(self) -> bool:
        self.look()
        return self.sameAt is not None

    def seen(self) -> str:
        return ", ".join(
            f"n{i}: {n.count()} keys, {CONFLICT}={n.get(CONFLICT)!r}"
            for i, n in self.bus.nodes.items()
        )


def formed(bus: Bus) -> None:
    def done() -> bool:
        seen = bus.look()
        return all(not ghosts(entries, i) for i, entries in seen.items())

    started = time.monotonic()
    took = wait(done, WAIT, "the bus to form", bus.seen) - started
    print(f"bus formed: every node lists the 4 others active ({took:.2f} s after the last start)")


def partitionRound(
    number: int,
    bus: Bus,
    network: Network,
    minority: Sequence[int],
    keys: tuple[int, int],
    values: tuple[str, str],
) -> None:
    """One partition, writes on both sides, one heal; prints what it measured."""
    majority = [i for i in bus.nodes if i not in minority]
    sides = {i: majority if i in majority else list(minority) for i in bus.nodes}
    majorityKeys, minorityKeys = keys
    majorityValue, minorityValue = values
    majorityWriter, minorityWriter = majority[-1], minority[-1]
    seedSide = "majority" if SEED in majority else "minority"
    print(
        f"\n== round {number}: partition {{{', '.join(f'n{i}' for i in majority)}}} / "
        f"{{{', '.join(f'n{i}' for i in minority)}}} (seed n{SEED} in the {seedSide})"
    )

    # 1. partition
    cutAt = network.move(minority, "br1")

    def onItsSide(i: int, entries: list[dict[str, Any]]) -> bool:
        return activeSet(entries) == {uri(j) for j in sides[i] if j != i}

    splitAt, apart = waitEach(
        bus, onItsSide, WAIT, "each side to list only its own nodes as active"
    )
    perNode = ", ".join(f"n{i} {apart[i] - cutAt:.2f}" for i in sorted(apart))
    print(
        f"partitioned: every node lists only its own side as active after "
        f"{splitAt - cutAt:.2f} s (per node, s: {perNode}):"
    )
    print(bus.seen())

    def settled() -> bool:
        seen = bus.look()
        for i, entries in seen.items():
            for u, status in others(entries).items():
                j = next((j for j in bus.nodes if uri(j) == u), None)
                if j is None:
                    return False
                if j not in sides[i] and not (j == SEED and status == "pending"):
                    return False
        return True

    settledAt = wait(settled, WAIT, "the other side to be removed from the lists", bus.seen)
    print(
        f"other side removed from every list after {settledAt - cutAt:.2f} s "
        f"(the seed n{SEED} stays, pending, on the side without it):"
    )
    print(bus.seen())

    # 2. writes on both sides
    writeStart = time.monotonic()
    bus.nodes[majorityWriter].send(f"write r{number}maj- {majorityKeys} 20 100")
    bus.nodes[minorityWriter].send(f"write r{number}min- {minorityKeys} 20 100")
    for writer in (majorityWriter, minorityWriter):
        rejected = int(bus.nodes[writer].expect("written", WAIT)[2])
        if rejected:
            raise BenchError(f"n{writer} refused {rejected} of its writes")
    # the side holding the greater value writes it first, the other last:
    # the rule is not "last write wins"
    first, last = (
        ((minorityWriter, minorityValue), (majorityWriter, majorityValue))
        if syncWinner(majorityValue, minorityValue) == minorityValue
        else ((majorityWriter, majorityValue), (minorityWriter, minorityValue))
    )
    bus.nodes[first[0]].set(CONFLICT, first[1])
    time.sleep(0.05)
    bus.nodes[last[0]].set(CONFLICT, last[1])
    before = bus.keys
    conflictNew = 0 if before else 1

    def sidesHold() -> bool:
        counts = bus.counts()
        return all(
            counts[i] == before + conflictNew + (majorityKeys if i in majority else minorityKeys)
            for i in bus.nodes
        ) and all(
            bus.nodes[i].get(CONFLICT) == (majorityValue if i in majority else minorityValue)
            for i in bus.nodes
        )

    heldAt = wait(sidesHold, WAIT, "each side to hold its own writes", lambda: str(bus.counts()))
    print(
        f"during the partition: {majorityKeys} keys written on n{majorityWriter} (majority), "
        f"{minorityKeys} on n{minorityWriter} (minority); {CONFLICT!r} = {first[1]!r} on "
        f"n{first[0]}, then {last[1]!r} on n{last[0]}; each side held its own writes "
        f"{heldAt - writeStart:.2f} s after the first write; keys per node: {bus.counts()}"
    )

    # 3. heal; from now on every look at the lists also looks at the keys (step 4)
    bus.keys = before + conflictNew + majorityKeys + minorityKeys
    watch = KeyWatch(bus)
    bus.onLook.append(watch.look)
    healAt = network.move(minority, "br0")
    listsAt, complete = waitEach(
        bus,
        lambda i, entries: not ghosts(entries, i),
        HEAL_WAIT,
        "every node to list all 5 active, nothing else",
    )
    perNode = ", ".join(f"n{i} {complete[i] - healAt:.2f}" for i in sorted(complete))
    print(
        f"healed: every node lists all 5 active and nothing else after "
        f"{listsAt - healAt:.2f} s (last time each node's list became complete, s: {perNode})"
    )
    watchEnd = time.monotonic() + 2 * PING
    looks = 0
    bad: list[str] = []
    while time.monotonic() < watchEnd:
        for i, entries in bus.look().items():
            bad += [f"{time.monotonic() - healAt:.1f} s n{i}: {g}" for g in ghosts(entries, i)]
        looks += 1
        time.sleep(POLL)
    print(
        f"two ping periods later ({2 * PING:g} s, {looks} looks at all 5 lists): "
        f"{len(bad)} ghost or non-active entries"
    )
    print(bus.seen())
    if bad:
        raise BenchError("ghosts after the heal:\n    " + "\n    ".join(bad[:20]))

    # 4. every key everywhere, one value for the conflicting key
    bus.onLook.remove(watch.look)
    wait(watch.done, WAIT, f"all {bus.keys} keys and one {CONFLICT!r} everywhere", watch.seen)
    assert watch.allKeysAt is not None and watch.sameAt is not None
    won = bus.nodes[SEED].get(CONFLICT)
    expected = syncWinner(majorityValue, minorityValue)
    side = "majority" if won == majorityValue else "minority"
    print(
        f"every node holds all {bus.keys} keys ({majorityKeys} + {minorityKeys} from this "
        f"round, {before} before, {CONFLICT!r}) {watch.allKeysAt - healAt:.2f} s after the heal, "
        f"and {CONFLICT}={won!r} everywhere after {watch.sameAt - healAt:.2f} s"
    )
    print(
        f"conflict: {won!r} (the {side}'s value, written "
        f"{'first' if won == first[1] else 'last'}) won over "
        f"{(minorityValue if won == majorityValue else majorityValue)!r}; the rule expects "
        f"{expected!r}: {'OK' if won == expected else 'WRONG'}"
    )
    if won != expected:
        raise BenchError(f"{CONFLICT!r} settled on {won!r}, the documented rule gives {expected!r}")
    counters(bus)


COUNTERS = {
    "notification.knocks_sent": "knocks sent",
    "notification.knocks_answered": "knocks answered",
    "notification.stale_failures_ignored": "stale failures ignored",
    "htable.resync.requests_sent": "re-sync requests",
    "htable.resync.retries": "re-sync retries",
    "htable.sync.unknown_requester": "sync requests from unlisted nodes",
}


def counters(bus: Bus) -> None:
    """Counters of the heal so far (since the start), one list per counter: n1..n5."""
    stats = {i: n.stats() for i, n in bus.nodes.items()}
    parts = [
        f"{label} {[stats[i].get(name, 0) for i in sorted(stats)]}"
        for name, label in COUNTERS.items()
    ]
    print("counters since the start, per node n1..n5: " + "; ".join(parts))


RULE = (
    "conflict rule, documented in README.md ('Writes survive partitions and restarts') and "
    "dmq_bus/peers/htable.py (HTablePeer, syncWinner): "
)


def scenario(args: argparse.Namespace) -> int:
    logDir = tempfile.mkdtemp(prefix="dmqb-partition-")
    network = Network()
    bus = Bus(logDir)
    try:
        network.build()
        print(
            f"{NODES} nodes, 10.213.0.1-5:{PORT}, seed n{SEED}, ping interval {PING:g} s, "
            f"removed-node hold {HOLD:g} s, health probes auto (on)"
        )
        doc = " ".join((syncWinner.__doc__ or "").split())
        print(RULE + doc.split(". ")[0].strip() + ".")
        bus.start()
        formed(bus)
        keys = (args.majority_keys, args.minority_keys)
        partitionRound(1, bus, network, (4, 5), keys, ("amber-r1", "sky-r1"))
        partitionRound(2, bus, network, (1, 2), keys, ("zinc-r2", "coal-r2"))
    except BenchError as e:
        print(f"FAILED: {e}")
        print(f"node logs: {logDir}")
        return 1
    finally:
        bus.stop()
        network.destroy()
    shutil.rmtree(logDir, ignore_errors=True)
    print("\nall checks passed; every node process stopped, namespaces removed")
    return 0


# ---------------------------------------------------------------------------
# entering the namespaces


def privateRunNetns(hostMountNamespace: str) -> str | None:
    """
    In our own mount namespace (not the host's), put a tmpfs on /run/netns
    so that C{ip netns add} creates its files there; the reason when not.
    """
    if os.readlink("/proc/self/ns/mnt") == hostMountNamespace:
        return "still in the host's mount namespace: refusing to create network namespaces"
    target = NETNS_DIR if os.path.isdir(NETNS_DIR) else "/run"
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "dmq-partition", target], capture_output=True, text=True
    )
    if done.returncode != 0:
        return f"mount tmpfs on {target}: {done.stderr.strip()}"
    os.makedirs(NETNS_DIR, exist_ok=True)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--majority-keys", type=int, default=2000, help="keys written per round")
    parser.add_argument("--minority-keys", type=int, default=500, help="keys written per round")
    args = parser.parse_args(argv)

    hostMountNamespace = os.environ.get(NETNS_MARK)
    if hostMountNamespace is None:
        missing = [tool for tool in ("ip", "unshare", "mount") if shutil.which(tool) is None]
        if os.geteuid() != 0:
            print("bench/partition.py needs root (network namespaces, bridges): not run")
            return 2
        if missing:
            print(f"bench/partition.py needs {', '.join(missing)}: not found, not run")
            return 2
        env = dict(os.environ, **{NETNS_MARK: os.readlink("/proc/self/ns/mnt")})
        command = ["unshare", "--net", "--mount", "--propagation", "private", "--"]
        command += [sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:])]
        return subprocess.call(command, env=env)
    reason = privateRunNetns(hostMountNamespace)
    if reason is not None:
        print(f"bench/partition.py: {reason}; not run")
        return 2
    return scenario(args)


if __name__ == "__main__":
    sys.exit(main())
