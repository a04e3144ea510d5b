"""
Seeds found through DNS, as Kamailio's C{multi_notify=1} finds them, and
found again every ping period (so that a bus can be seeded from, say, a
Kubernetes headless service whose addresses come and go).

One resolution of a notification address C{sip:NAME[:PORT][;params]}
(Kamailio 5.6.3's C{get_dmq_host_list}):

 1. SRV records of C{NAME} itself; no C{_sip._udp.} prefix is added, so
    give the full SRV name (e.g. C{_sip._udp.dmq.ns.svc.cluster.local}) to
    use a service's SRV records. With a C{PORT}, only records with that
    port are kept. Records are taken by priority, then heaviest weight.
 2. The A, then AAAA records of each SRV target, each with the record's port.
 3. The A, then AAAA records of C{NAME} itself, with C{PORT} (5060 if none;
    Kamailio writes no port then, which its node lists read as 5060 too).

Each address becomes a seed C{sip:IP:PORT[;params]} (the original URI's
parameters, e.g. C{;transport=tcp}, are kept), duplicates once, at most
L{MAX_HOSTS} of them. A name that does not exist, or has no records of a
type, gives no seeds for it; any other DNS error (timeout, server failure)
fails the whole resolution, and the seeds found before are kept.

Names are resolved with C{twisted.names} against the name servers of
C{/etc/resolv.conf}, without its search list: give a fully qualified name.
"""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, FirstError, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.names import client, dns
from twisted.names.error import DNSNameError
from twisted.python.failure import Failure

from dmq_bus.sip.uri import SIPURI

MAX_HOSTS = 30
"""Most seeds one resolution gives (Kamailio's C{MAXDMQHOSTS}); the rest are dropped (counted)."""

DNS_TIMEOUT = (1.0, 3.0)
"""Seconds before each retry of a DNS query; after the last one the query fails."""

RESOLV_CONF = "/etc/resolv.conf"


def systemNameServers(path: str = RESOLV_CONF) -> list[tuple[str, int]]:
    """
    The C{nameserver} lines of a resolv.conf, as C{(host, 53)}; like the
    C library, 127.0.0.1 when there are none or the file is missing.
    """
    servers = []
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                words = line.split()
                if len(words) >= 2 and words[0] == "nameserver":
                    servers.append((words[1], 53))
    except OSError:
        pass
    return servers or [("127.0.0.1", 53)]


async def _records(lookup: Deferred[Any], type: int) -> list[Any]:
    """The payloads of type C{type} in a lookup's answers; none if the name does not exist."""
    try:
        answers, _authority, _additional = await lookup
    except DNSNameError:
        return []
    return [r.payload for r in answers if r.type == type]


async def _addresses(resolver: Any, name: str, timeout: Sequence[float]) -> list[str]:
    """The IPv4 then IPv6 addresses of C{name}, IPv6 ones in brackets."""
    v4, v6 = await gatherResults(
        [
            Deferred.fromCoroutine(_records(resolver.lookupAddress(name, timeout), dns.A)),
            Deferred.fromCoroutine(_records(resolver.lookupIPV6Address(name, timeout), dns.AAAA)),
        ],
        consumeErrors=True,
    )
    return [record.dottedQuad() for record in v4] + [
        f"[{socket.inet_ntop(socket.AF_INET6, record.address)}]" for record in v6
    ]


async def _resolve(resolver: Any, address: SIPURI, timeout: Sequence[float]) -> list[SIPURI]:
    name = address.host
    services = await _records(resolver.lookupService(name, timeout), dns.SRV)
    services.sort(key=lambda s: (s.priority, -s.weight, str(s.target), s.port))
    hosts = [
        (str(s.target), s.port)
        for s in services
        if str(s.target) not in ("", ".") and (address.port is None or s.port == address.port)
    ]
    hosts.append((name, address.defaultedPort))
    found = await gatherResults(
        [Deferred.fromCoroutine(_addresses(resolver, host, timeout)) for host, _ in hosts],
        consumeErrors=True,
    )
    seeds: dict[str, SIPURI] = {}
    for (_, port), ips in zip(hosts, found):
        for ip in ips:
            seed = SIPURI(host=ip, port=port, params=address.params)
            seeds.setdefault(str(seed), seed)
    return list(seeds.values())


def resolveSeeds(
    resolver: Any, address: SIPURI, timeout: Sequence[float] = DNS_TIMEOUT
) -> Deferred[list[SIPURI]]:
    """
    Every seed the DNS gives for notification address C{address} (see the
    module docstring), in Kamailio's order, uncapped. C{resolver} is an
    C{IResolver}. Fails with the first DNS error other than a missing name.
    """

    def firstError(failure: Failure) -> Failure:
        failure.trap(FirstError)
        error = failure.value
        assert isinstance(error, FirstError)
        sub: Failure = error.subFailure
        return sub

    return Deferred.fromCoroutine(_resolve(resolver, address, timeout)).addErrback(firstError)


class SeedDiscovery(Service):
    """
    Resolves a notification address into seeds at start and every
    C{interval} seconds after (timed by C{clock}), and hands each new set of
    seeds to C{onSeeds} (e.g. L{NotificationPeer.setSeeds}). A failed
    resolution keeps the seeds found before.

    Counters: C{discovery.resolutions}, C{discovery.failures},
    C{discovery.seeds_added}, C{discovery.seeds_dropped},
    C{discovery.truncated} (more than C{maxHosts} addresses),
    C{discovery.empty} (a resolution that found no address).

    @ivar seeds: the seeds of the last successful resolution.
    """

    log = Logger()

    def __init__(
        self,
        address: SIPURI,
        resolver: Any,
        clock: IReactorTime,
        interval: float,
        onSeeds: Callable[[Sequence[SIPURI]], None],
        counters: Counter[str] | None = None,
        maxHosts: int = MAX_HOSTS,
        timeout: Sequence[float] = DNS_TIMEOUT,
    ) -> None:
        """
        @param resolver: an C{IResolver}, or None for one that asks the name
            servers of C{/etc/resolv.conf}, made at start (C{clock} must then
            be a reactor).
        """
        self.address = address
        self.resolver = resolver
        self.clock = clock
        self.interval = interval
        self.onSeeds = onSeeds
        self.counters: Counter[str] = counters if counters is not None else Counter()
        self.maxHosts = maxHosts
        self.timeout = timeout
        self.seeds: tuple[SIPURI, ...] = ()
        self._loop: LoopingCall | None = None
        self._failing = False
        self._empty = False

    @property
    def dnsName(self) -> str:
        """The DNS name resolved."""
        return self.address.host

    def startService(self) -> None:
        """Resolve now, and every C{interval} seconds (a slow resolution delays the next)."""
        super().startService()  # type: ignore[no-untyped-call]
        if self.resolver is None:
            self.resolver = client.Resolver(servers=systemNameServers(), reactor=self.clock)
        self._loop = LoopingCall(self.refresh)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True).addErrback(
            lambda f: self.log.failure("DNS discovery loop died", f)
        )

    def stopService(self) -> None:
        """Resolve no more (an answer still on its way is ignored)."""
        super().stopService()  # type: ignore[no-untyped-call]
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def refresh(self) -> Deferred[None]:
        """Resolve once and apply the outcome; never fails."""
        d = resolveSeeds(self.resolver, self.address, self.timeout)
        return d.addCallbacks(self._found, self._failed)

    def _found(self, seeds: list[SIPURI]) -> None:
        if not self.running:
            return
        self.counters["discovery.resolutions"] += 1
        if self._failing:
            self._failing = False
            self.log.info("DNS discovery of {name} answers again", name=self.dnsName)
        if len(seeds) > self.maxHosts:
            self.counters["discovery.truncated"] += 1
            self.log.debug(
                "DNS discovery of {name}: {count} addresses, keeping the first {seeds}",
                name=self.dnsName,
                count=len(seeds),
                seeds=self.maxHosts,
            )
            seeds = seeds[: self.maxHosts]
        if not seeds:
            self.counters["discovery.empty"] += 1
            if not self._empty:
                self.log.warn("DNS discovery: {name} has no address", name=self.dnsName)
        self._empty = not seeds
        before, after = set(self.seeds), set(seeds)
        if before == after:
            return
        self.counters["discovery.seeds_added"] += len(after - before)
        self.counters["discovery.seeds_dropped"] += len(before - after)
        self.seeds = tuple(seeds)
        self.log.debug(
            "DNS discovery of {name}: {seeds} seeds", name=self.dnsName, seeds=len(self.seeds)
        )
        self.onSeeds(self.seeds)

    def _failed(self, failure: Failure) -> None:
        if not self.running:
            return
        self.counters["discovery.failures"] += 1
        emit = self.log.debug if self._failing else self.log.warn
        self._failing = True
        emit(
            "DNS discovery of {name} failed ({error}); keeping the {seeds} seeds found before",
            name=self.dnsName,
            error=_describe(failure),
            seeds=len(self.seeds),
        )


def _describe(failure: Failure) -> str:
    error = failure.value
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
