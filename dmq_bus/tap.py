"""
C{twistd dmq} / C{twist dmq}: command-line options and the service they make.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from twisted.application.service import IService
from twisted.logger import LogLevel
from twisted.plugin import getPlugins
from twisted.python import usage

from dmq_bus.bus.discovery import SeedDiscovery
from dmq_bus.bus.dispatch import BusConfig
from dmq_bus.bus.guard import AccessPolicy, loadSecret, parseNetworks
from dmq_bus.bus.health import HEALTH_MODES, HealthConfig
from dmq_bus.bus.values import isIPLiteral
from dmq_bus.config import (
    DEFAULT_SERVER_ADDRESS,
    SETTINGS,
    ConfigError,
    ConfigFile,
    loadConfig,
    merge,
)
from dmq_bus.control import ControlAPI, ControlService
from dmq_bus.interfaces import IDMQPeerFactory, IHashTables
from dmq_bus.logs import LOG_LEVELS, LogLevelGate, LogLevelService
from dmq_bus.peers.htable import HTablePeer, TableSpec, parseTableSpecs
from dmq_bus.service import DMQService, NodeConfig
from dmq_bus.sip.errors import SIPParseError
from dmq_bus.sip.transaction import TimerPolicy, TransactionLimits
from dmq_bus.sip.uri import SIPURI

__all__ = [
    "DEFAULT_SERVER_ADDRESS",
    "Options",
    "addControl",
    "addDiscovery",
    "addLogLevel",
    "makeService",
    "peerFactories",
    "registerPeers",
]


def _flag(name: str) -> Callable[[str], Any]:
    """The coercer of C{--name}: the value, or an error naming the option."""
    return SETTINGS[name].fromFlag


def _default(name: str) -> str:
    default = SETTINGS[name].default
    if isinstance(default, list):
        return ", ".join(default) or "none"
    return {True: "1", False: "0", None: "none", "": '""'}.get(default, str(default))


def _parameter(name: str, short: str | None, help: str) -> list[Any]:
    """
    An C{optParameters} row for setting C{name}: its default is None (so
    that L{Options} knows it was not given and the config file may set it),
    the real default is in the help text.
    """
    return [name, short, None, f"{help} [default: {_default(name)}]", _flag(name)]


def peerFactories() -> dict[str, IDMQPeerFactory]:
    """Every installed peer factory (Twisted plugins), by name."""
    import twisted.plugins

    return {f.name: f for f in getPlugins(IDMQPeerFactory, twisted.plugins)}


class Options(usage.Options):
    """Options of a dmq-bus node; names follow Kamailio's dmq modparams."""

    synopsis = "[options]"
    longdesc = (
        "Run one node of a DMQ bus, wire-compatible with Kamailio 5.6's dmq module. "
        "With no options: a single-node bus on sip:127.0.0.1:5060 (UDP and TCP)."
    )

    optParameters = [
        [
            "config",
            "c",
            None,
            "Read settings from this TOML file (keys: the long option names); "
            "options given here win over it. See examples/dmq.toml.",
        ],
        _parameter(
            "server-address",
            "s",
            "This node's own URI, sip:IP:PORT[;transport=tcp|tls]; it listens on UDP and TCP "
            "there (UDP and TLS for tls, which needs --tls-certificate, --tls-key, --tls-ca).",
        ),
        _parameter(
            "notification-channel",
            None,
            "The membership channel (Kamailio's notification_channel).",
        ),
        _parameter(
            "multi-notify",
            None,
            "1: the first --notification-address may be a DNS name, resolved (SRV, A, AAAA) "
            "into seeds at start and again every --ping-interval (Kamailio's multi_notify).",
        ),
        _parameter("ping-interval", None, "Seconds between pings to every node."),
        _parameter(
            "ping-timeout",
            None,
            "Seconds a ping waits for its answer before the node counts as failed.",
        ),
        _parameter(
            "request-timeout",
            None,
            "Seconds an application message waits for its answer (none: 64*T1 = 32).",
        ),
        _parameter("leave-timeout", None, "Seconds to wait for leave acknowledgements on stop."),
        _parameter("t1", None, "SIP timer T1 (first UDP retransmission), seconds."),
        _parameter("t2", None, "SIP timer T2 (longest UDP retransmission interval), seconds."),
        _parameter("max-nodes", None, "Most nodes the node list holds."),
        _parameter(
            "max-transactions", None, "Most open outgoing requests; past it sends fail at once."
        ),
        _parameter(
            "health",
            None,
            "Failure detection between dmq-bus nodes by probes: auto (on when faster than "
            "--ping-interval + --ping-timeout), on or off.",
        ),
        _parameter("probe-interval", None, "Seconds between two health probes of a node."),
        _parameter(
            "probe-timeout",
            None,
            "Seconds a health probe waits for its answer (indirect probes: that + 0.2, at least 0.5).",
        ),
        _parameter("indirect-probes", None, "Nodes asked to probe a node that did not answer."),
        _parameter(
            "suspicion-timeout", None, "Seconds a suspected node has to answer before it fails."
        ),
        _parameter("user-agent", None, "User-Agent/Server header text; empty for none."),
        _parameter(
            "control",
            None,
            "Serve the JSON-RPC control API (POST /RPC, dmq-ctl) on this Twisted endpoint; "
            "'none' for no control API. It has no authentication: keep it on loopback.",
        ),
        _parameter(
            "secret-file",
            None,
            "Sign every KDMQ request with the shared secret in this file (16 bytes or more) "
            "and refuse requests not signed with it.",
        ),
        _parameter(
            "signature-window",
            None,
            "Seconds a signed request's time may differ from ours, either way.",
        ),
        _parameter(
            "tls-certificate",
            None,
            "This node's certificate, PEM, for ;transport=tls (with --tls-key and --tls-ca); "
            "its subjectAltName must hold the node's IP address.",
        ),
        _parameter("tls-key", None, "The private key of --tls-certificate, PEM, unencrypted."),
        _parameter(
            "tls-ca",
            None,
            "CA bundle, PEM: TLS peers must present a certificate it verifies (both ways).",
        ),
        _parameter(
            "log-level",
            None,
            "Drop log events below this level: debug, info, warn, error or critical.",
        ),
    ]

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self["notification-address"] = []
        self["peer"] = []
        self["htable"] = []
        self["allow-network"] = []
        self["unsigned-from"] = []
        self["known-nodes-only"] = None
        self["tls-only"] = None

    def opt_notification_address(self, value: str) -> None:
        """A seed to join through, sip:IP:PORT (repeatable)."""
        self["notification-address"].append(value)

    def opt_htable(self, value: str) -> None:
        """
        Declare a replicated table NAME[=OPTIONS], OPTIONS as Kamailio's
        (autoexpire=SECONDS;dmqreplicate=0|1); repeatable. Default: one table
        'kv'. 'none': no htable peer.
        """
        self["htable"].append(value)

    def opt_allow_network(self, value: str) -> None:
        """Accept requests only from this network, CIDR (repeatable). [default: any]"""
        self["allow-network"].append(value)

    def opt_known_nodes_only(self) -> None:
        """Refuse application-channel requests from senders not listed active."""
        self["known-nodes-only"] = True

    def opt_tls_only(self) -> None:
        """Answer 403 to every request not over TLS (needs a tls server address, --tls-*)."""
        self["tls-only"] = True

    def opt_unsigned_from(self, value: str) -> None:
        """With --secret-file: accept unsigned requests from this CIDR (repeatable)."""
        self["unsigned-from"].append(value)

    def opt_peer(self, value: str) -> None:
        """Load peer NAME[=OPTIONS] from the installed peer plugins (repeatable)."""
        self["peer"].append(value)

    def opt_list_peers(self) -> None:
        """List the installed peers and exit."""
        for name, factory in sorted(peerFactories().items()):
            print(f"{name:12} {factory.description}")
        raise SystemExit(0)

    def postOptions(self) -> None:
        given = {name: self.get(name) for name in SETTINGS}
        config = _readConfig(self["config"])
        self.update(merge(given, config.values if config is not None else {}))

        def origin(name: str) -> str:
            """Where setting C{name} came from, to begin an error message with."""
            if config is not None and name in config.values and given[name] in (None, []):
                return config.where(name)
            return f"--{name}"

        self["serverAddress"] = _parseAddress(origin("server-address"), self["server-address"])
        addresses = [
            _parseAddress(origin("notification-address"), a) for a in self["notification-address"]
        ]
        self["notificationAddresses"], self["discoveryAddress"] = _seedsAndDiscovery(
            addresses, self["multi-notify"], origin("notification-address")
        )
        try:
            self["timers"] = TimerPolicy(t1=self["t1"], t2=self["t2"])
        except ValueError as e:
            raise usage.UsageError(f"{origin('t1')}/{origin('t2')}: {e}") from None
        try:
            self["busConfig"] = BusConfig(
                serverAddress=self["serverAddress"],
                notificationAddresses=self["notificationAddresses"],
                channel=self["notification-channel"],
                pingInterval=self["ping-interval"],
                pingTimeout=self["ping-timeout"],
                requestTimeout=self["request-timeout"],
                leaveTimeout=self["leave-timeout"],
                userAgent=self["user-agent"] or None,
                maxNodes=self["max-nodes"],
                access=_accessPolicy(self, origin),
            )
        except ValueError as e:
            raise usage.UsageError(f"{origin('server-address')}: {e}") from None
        try:
            self["healthConfig"] = HealthConfig(
                enabled=HEALTH_MODES[self["health"]],
                probeInterval=self["probe-interval"],
                probeTimeout=self["probe-timeout"],
                indirectTimeout=max(HealthConfig().indirectTimeout, self["probe-timeout"] + 0.2),
                indirectProbes=self["indirect-probes"],
                suspicionTimeout=self["suspicion-timeout"],
            )
        except ValueError as e:
            raise usage.UsageError(f"{origin('probe-timeout')}: {e}") from None
        if not self["notification-channel"] or not _isToken(self["notification-channel"]):
            raise usage.UsageError(f"{origin('notification-channel')} must be a non-empty token")
        factories = peerFactories()
        self["peerSpecs"] = [_splitPeer(origin("peer"), spec, factories) for spec in self["peer"]]
        self["tableSpecs"] = _tableSpecs(origin("htable"), self["htable"])
        self["logLevel"] = LOG_LEVELS[self["log-level"]]
        self["tlsContexts"] = _tlsContexts(self, origin)


def _accessPolicy(options: Options, origin: Callable[[str], str]) -> AccessPolicy:
    """The L{AccessPolicy} of the access options; a usage error naming the bad one."""
    window = options["signature-window"]
    networks = {}
    for name in ("allow-network", "unsigned-from"):
        try:
            networks[name] = parseNetworks(options[name])
        except ValueError as e:
            raise usage.UsageError(f"--{name}: {e}") from None
    secret = None
    if options.get("secret-file") is not None:
        try:
            secret = loadSecret(options["secret-file"])
        except ValueError as e:
            raise usage.UsageError(f"--secret-file: {e}") from None
    if networks["unsigned-from"] and secret is None:
        raise usage.UsageError(
            "--unsigned-from needs --secret-file (without it, nothing is signed)"
        )
    if options["tls-only"]:
        _checkTLSOnly(options, origin("tls-only"))
    return AccessPolicy(
        allowNetworks=networks["allow-network"],
        knownNodesOnly=options["known-nodes-only"],
        secret=secret,
        unsignedFrom=networks["unsigned-from"],
        signatureWindow=window,
        tlsOnly=options["tls-only"],
    )


def _checkTLSOnly(options: Options, option: str) -> None:
    """
    A usage error, beginning with C{option}, unless TLS-only can work: the
    server address and every seed are C{;transport=tls}, and the TLS
    options are given.
    """
    server = options["serverAddress"]
    if server.transport != "tls":
        raise usage.UsageError(
            f"{option} needs a server address with ;transport=tls, not {server} "
            "(every request not over TLS is refused)"
        )
    missing = [f"--{name}" for name in TLS_OPTIONS if options[name] is None]
    if missing:
        raise usage.UsageError(f"{option} needs {', '.join(missing)} (TLS settings)")
    seeds = [*options["notificationAddresses"]]
    if options["discoveryAddress"] is not None:
        seeds.append(options["discoveryAddress"])
    for seed in seeds:
        if seed.transport != "tls":
            raise usage.UsageError(
                f"{option}: seed {seed} is not ;transport=tls "
                "(this node's join and node list would go to it in clear)"
            )


TLS_OPTIONS = ("tls-certificate", "tls-key", "tls-ca")


def _tlsContexts(options: Options, origin: Callable[[str], str]) -> Any:
    """
    The L{dmq_bus.sip.tls.TLSContexts} of the TLS options, or None when
    none is given; a usage error when some are missing, a file is bad, or a
    tls address is used without them.
    """
    given = [name for name in TLS_OPTIONS if options[name] is not None]
    addresses = [options["serverAddress"], *options["notificationAddresses"]]
    if not given:
        for address in addresses:
            if address.transport == "tls":
                raise usage.UsageError(
                    f"{address} uses TLS: give --tls-certificate, --tls-key and --tls-ca"
                )
        return None
    missing = [f"--{name}" for name in TLS_OPTIONS if options[name] is None]
    if missing:
        raise usage.UsageError(
            f"{origin(given[0])} needs {' and '.join(missing)} too "
            "(TLS needs a certificate, its key and the CA bundle)"
        )
    try:
        from dmq_bus.sip.tls import TLSContexts, loadAuthorities, loadNodeCertificate
    except ImportError as e:
        raise usage.UsageError(
            f'TLS needs pyOpenSSL and service_identity: pip install "twisted[tls]" ({e})'
        ) from None
    try:
        certificate = loadNodeCertificate(options["tls-certificate"], options["tls-key"])
    except ValueError as e:
        raise usage.UsageError(f"{origin('tls-certificate')}/{origin('tls-key')}: {e}") from None
    try:
        authorities = loadAuthorities(options["tls-ca"])
    except ValueError as e:
        raise usage.UsageError(f"{origin('tls-ca')}: {e}") from None
    return TLSContexts(certificate, authorities)


def _readConfig(path: str | None) -> ConfigFile | None:
    if path is None:
        return None
    try:
        return loadConfig(path)
    except ConfigError as e:
        raise usage.UsageError(f"--config: {e}") from None


def _seedsAndDiscovery(
    addresses: list[SIPURI], multiNotify: bool, origin: str
) -> tuple[tuple[SIPURI, ...], SIPURI | None]:
    """
    The configured seeds, and the address to resolve by DNS (or None). As
    Kamailio's multi_notify=1, only the first address is used then: an IP
    literal as a seed, a name through DNS; more than one is refused here.
    """
    if not multiNotify:
        for address in addresses:
            if not isIPLiteral(address.host):
                raise usage.UsageError(
                    f"{origin}: host must be an IP literal, not {address.host!r} "
                    "(with --multi-notify 1 the first notification address may be a DNS name)"
                )
        return tuple(addresses), None
    if len(addresses) > 1:
        raise usage.UsageError(
            f"{origin}: with --multi-notify 1 only one notification address is used "
            f"(as Kamailio's multi_notify), not {len(addresses)}"
        )
    if not addresses:
        return (), None
    (address,) = addresses
    if isIPLiteral(address.host):
        return (address,), None
    if address.scheme != "sip":
        raise usage.UsageError(f"{origin}: only sip: addresses can be resolved, not {address}")
    return (), address


def _isToken(text: str) -> bool:
    return all(c.isalnum() or c in "-_.!%*+`'~" for c in text)


def _parseAddress(option: str, text: str) -> SIPURI:
    try:
        uri = SIPURI.parse(text)
    except SIPParseError as e:
        raise usage.UsageError(f"{option}: not a SIP URI: {text!r} ({e.reason})") from None
    if uri.scheme.lower() == "sips":
        hostPort = uri.host if uri.port is None else f"{uri.host}:{uri.port}"
        raise usage.UsageError(
            f"{option}: sips: is not supported: Kamailio 5.6.3's DMQ ignores the scheme "
            f"(sips:{hostPort} runs over UDP, in clear); write sip:{hostPort};transport=tls"
        )
    if uri.scheme != "sip" or uri.transport not in ("udp", "tcp", "tls"):
        raise usage.UsageError(
            f"{option}: transport {uri.transport!r} is not supported (sip: with udp, tcp or tls)"
        )
    return uri


def _tableSpecs(origin: str, values: list[str]) -> list[TableSpec]:
    if values in (["none"], []):
        return []
    try:
        return parseTableSpecs(",".join(values))
    except ValueError as e:
        raise usage.UsageError(f"{origin}: {e}") from None


def _splitPeer(
    origin: str, spec: str, factories: dict[str, IDMQPeerFactory]
) -> tuple[IDMQPeerFactory, str]:
    name, _, options = spec.partition("=")
    factory = factories.get(name)
    if factory is None:
        known = ", ".join(sorted(factories)) or "none installed"
        raise usage.UsageError(f"{origin}: no peer named {name!r} (installed: {known})")
    return factory, options


def makeService(options: Options) -> IService:
    """The L{DMQService} the options describe, with its peers registered."""
    service = DMQService(
        NodeConfig(
            bus=options["busConfig"],
            timers=options["timers"],
            transactionLimits=TransactionLimits(maxClientTransactions=options["max-transactions"]),
            tls=options["tlsContexts"],
        )
    )
    service.stack.notification.configureHealth(options["healthConfig"])
    if options["tableSpecs"]:
        service.bus.registerPeer(HTablePeer(service.bus, service.reactor, options["tableSpecs"]))
    registerPeers(service, options["peerSpecs"])
    if options["control"] != "none":
        addControl(service, options["control"])
    if options["discoveryAddress"] is not None:
        addDiscovery(service, options["discoveryAddress"])
    addLogLevel(service, options["logLevel"])
    return service


def addDiscovery(service: DMQService, address: SIPURI, resolver: Any = None) -> SeedDiscovery:
    """
    Resolve C{address} into seeds of C{service} (Kamailio's multi_notify)
    while it runs, again every ping interval. C{resolver}: an C{IResolver},
    by default one asking the name servers of C{/etc/resolv.conf}.
    """
    discovery = SeedDiscovery(
        address,
        resolver,
        service.reactor,
        service.config.bus.pingInterval,
        service.stack.notification.setSeeds,
        service.bus.counters,
    )
    discovery.setServiceParent(service)  # type: ignore[no-untyped-call]
    return discovery


def addLogLevel(service: DMQService, level: LogLevel) -> LogLevelService:
    """Drop log events below C{level} (all of them, at every observer) while C{service} runs."""
    gate = LogLevelService(LogLevelGate(level), service.reactor)
    gate.setServiceParent(service)  # type: ignore[no-untyped-call]
    return gate


def addControl(service: DMQService, endpoint: str) -> ControlService:
    """Serve the control API of C{service} on C{endpoint}, started and stopped with it."""
    tables = next((p for p in service.bus.peers() if IHashTables.providedBy(p)), None)
    api = ControlAPI(service.bus, tables, service.stack.stats)
    control = ControlService(api, endpoint, service.reactor)
    control.setServiceParent(service)  # type: ignore[no-untyped-call]
    return control


def registerPeers(service: DMQService, specs: Iterable[tuple[IDMQPeerFactory, str]]) -> None:
    """Make and register one peer per C{(factory, options)}."""
    for factory, peerOptions in specs:
        try:
            peer = factory.makePeer(service.bus, peerOptions)
        except ValueError as e:
            raise usage.UsageError(f"--peer {factory.name}: {e}") from None
        service.bus.registerPeer(peer)
