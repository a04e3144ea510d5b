"""
C{twistd dmq} / C{twist dmq}: command-line options and the service they make.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from twisted.application.service import IService
from twisted.plugin import getPlugins
from twisted.python import usage

from dmq_bus.bus.dispatch import DEFAULT_CHANNEL, USER_AGENT, BusConfig
from dmq_bus.bus.nodelist import DEFAULT_MAX_NODES
from dmq_bus.control import DEFAULT_CONTROL_ENDPOINT, ControlAPI, ControlService
from dmq_bus.interfaces import IDMQPeerFactory, IHashTables
from dmq_bus.peers.htable import HTablePeer, TableSpec, parseTableSpecs
from dmq_bus.service import DMQService, NodeConfig
from dmq_bus.sip.errors import SIPParseError
from dmq_bus.sip.transaction import TimerPolicy, TransactionLimits
from dmq_bus.sip.uri import SIPURI

DEFAULT_SERVER_ADDRESS = "sip:127.0.0.1:5060"


def _positive(option: str) -> Callable[[str], float]:
    """A coercer for C{--option}: a number > 0, or an error naming the option."""

    def coerce(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not number > 0:
            raise ValueError(f"--{option} must be a number > 0, not {value!r}")
        return number

    return coerce


def _positiveInt(option: str) -> Callable[[str], int]:
    """A coercer for C{--option}: a whole number > 0, or an error naming the option."""

    def coerce(value: str) -> int:
        if not value.isdigit() or int(value) <= 0:
            raise ValueError(f"--{option} must be a whole number > 0, not {value!r}")
        return int(value)

    return coerce


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
            "server-address",
            "s",
            DEFAULT_SERVER_ADDRESS,
            "This node's own URI, sip:IP:PORT[;transport=tcp]; it listens on UDP and TCP there.",
        ],
        [
            "notification-channel",
            None,
            DEFAULT_CHANNEL,
            "The membership channel (Kamailio's notification_channel).",
        ],
        [
            "ping-interval",
            None,
            5.0,
            "Seconds between pings to every node.",
            _positive("ping-interval"),
        ],
        [
            "ping-timeout",
            None,
            5.0,
            "Seconds a ping waits for its answer before the node counts as failed.",
            _positive("ping-timeout"),
        ],
        [
            "request-timeout",
            None,
            None,
            "Seconds an application message waits for its answer (default 64*T1 = 32).",
            _positive("request-timeout"),
        ],
        [
            "leave-timeout",
            None,
            2.0,
            "Seconds to wait for leave acknowledgements on stop.",
            _positive("leave-timeout"),
        ],
        ["t1", None, 0.5, "SIP timer T1 (first UDP retransmission), seconds.", _positive("t1")],
        [
            "t2",
            None,
            4.0,
            "SIP timer T2 (longest UDP retransmission interval), seconds.",
            _positive("t2"),
        ],
        [
            "max-nodes",
            None,
            DEFAULT_MAX_NODES,
            "Most nodes the node list holds.",
            _positiveInt("max-nodes"),
        ],
        [
            "max-transactions",
            None,
            TransactionLimits().maxClientTransactions,
            "Most open outgoing requests; past it sends fail at once.",
            _positiveInt("max-transactions"),
        ],
        ["user-agent", None, USER_AGENT, "User-Agent/Server header text; empty for none."],
        [
            "control",
            None,
            DEFAULT_CONTROL_ENDPOINT,
            "Serve the JSON-RPC control API (POST /RPC, dmq-ctl) on this Twisted endpoint; "
            "'none' for no control API. It has no authentication: keep it on loopback.",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self["notification-address"] = []
        self["peer"] = []
        self["htable"] = []

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

    def opt_peer(self, value: str) -> None:
        """Load peer NAME[=OPTIONS] from the installed peer plugins (repeatable)."""
        self["peer"].append(value)

    def opt_list_peers(self) -> None:
        """List the installed peers and exit."""
        for name, factory in sorted(peerFactories().items()):
            print(f"{name:12} {factory.description}")
        raise SystemExit(0)

    def postOptions(self) -> None:
        self["serverAddress"] = _parseAddress("--server-address", self["server-address"])
        self["notificationAddresses"] = tuple(
            _parseAddress("--notification-address", a) for a in self["notification-address"]
        )
        try:
            self["timers"] = TimerPolicy(t1=self["t1"], t2=self["t2"])
        except ValueError as e:
            raise usage.UsageError(f"--t1/--t2: {e}") from None
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
            )
        except ValueError as e:
            raise usage.UsageError(f"--server-address: {e}") from None
        if not self["notification-channel"] or not _isToken(self["notification-channel"]):
            raise usage.UsageError("--notification-channel must be a non-empty token")
        factories = peerFactories()
        self["peerSpecs"] = [_splitPeer(spec, factories) for spec in self["peer"]]
        self["tableSpecs"] = _tableSpecs(self["htable"])


def _isToken(text: str) -> bool:
    return all(c.isalnum() or c in "-_.!%*+`'~" for c in text)


def _parseAddress(option: str, text: str) -> SIPURI:
    try:
        uri = SIPURI.parse(text)
    except SIPParseError as e:
        raise usage.UsageError(f"{option}: not a SIP URI: {text!r} ({e.reason})") from None
    if uri.transport not in ("udp", "tcp"):
        raise usage.UsageError(f"{option}: transport {uri.transport!r} is not supported (udp, tcp)")
    return uri


def _tableSpecs(values: list[str]) -> list[TableSpec]:
    if values == ["none"]:
        return []
    if not values:
        values = ["kv"]
    try:
        return parseTableSpecs(",".join(values))
    except ValueError as e:
        raise usage.UsageError(f"--htable: {e}") from None


def _splitPeer(spec: str, factories: dict[str, IDMQPeerFactory]) -> tuple[IDMQPeerFactory, str]:
    name, _, options = spec.partition("=")
    factory = factories.get(name)
    if factory is None:
        known = ", ".join(sorted(factories)) or "none installed"
        raise usage.UsageError(f"--peer: no peer named {name!r} (installed: {known})")
    return factory, options


def makeService(options: Options) -> IService:
    """The L{DMQService} the options describe, with its peers registered."""
    service = DMQService(
        NodeConfig(
            bus=options["busConfig"],
            timers=options["timers"],
            transactionLimits=TransactionLimits(maxClientTransactions=options["max-transactions"]),
        )
    )
    if options["tableSpecs"]:
        service.bus.registerPeer(HTablePeer(service.bus, service.reactor, options["tableSpecs"]))
    registerPeers(service, options["peerSpecs"])
    if options["control"] != "none":
        addControl(service, options["control"])
    return service


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
