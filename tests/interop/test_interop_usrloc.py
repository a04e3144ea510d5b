"""
The usrloc observer of a dmq-bus node in one DMQ bus with a real Kamailio
5.6.3 node that stores registrations (usrloc, registrar) and replicates them
(dmq_usrloc, C{enable=1}): a REGISTER sent to Kamailio reaches the observer
as a contact update, an unREGISTER as a removal, a sync request brings back
every contact in one C{{"multi":...}} batch, and Kamailio keeps answering.

The Kamailio node runs C{kamailio-usrloc.cfg} (next to this file), derived
from the harness's C{kamailio-node.cfg}. Skipped, loudly, only where
Kamailio is not installed.
"""

# Twisted's assert* methods carry no annotations: calling them is fine here.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from dmq_bus.bus.dispatch import BusConfig
from dmq_bus.peers.observed import (
    Contact,
    ContactRemove,
    Observation,
    UsrlocObserver,
)
from dmq_bus.service import DMQService, NodeConfig
from dmq_bus.sip.message import Response
from dmq_bus.sip.parser import parseMessage
from dmq_bus.sip.uri import SIPURI

from . import kamailio as harness
from .kamailio import (
    SKIP_REASON,
    KamailioNode,
    allocatePorts,
    bothActive,
    kamailioAvailable,
    waitFor,
)

log = Logger()

CONFIG_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kamailio-usrloc.cfg")
"""The Kamailio config of these tests: the harness's, with usrloc replicated."""

DOMAIN = "example.test"


class UsrlocKamailioNode(KamailioNode):
    """A harness Kamailio node started with L{CONFIG_PATH}."""

    def commandLine(self) -> list[str]:
        args = super().commandLine()
        args[args.index(harness.CONFIG_PATH)] = CONFIG_PATH
        return args


class SIPPhone(DatagramProtocol):
    """
    A minimal UDP user agent: sends requests built by hand and fires the
    Deferred of each with its final response (matched by Call-ID).
    """

    def __init__(self) -> None:
        self.waiting: dict[str, Deferred[Response]] = {}

    @property
    def port(self) -> int:
        assert self.transport is not None
        port: int = self.transport.getHost().port
        return port

    def request(
        self, method: str, uri: str, target: int, headers: list[str], body: bytes = b""
    ) -> Deferred[Response]:
        """Send C{method} to 127.0.0.1:C{target}; fires with the final response."""
        callID = secrets.token_hex(8) + "@127.0.0.1"
        lines = [
            f"{method} {uri} SIP/2.0",
            f"Via: SIP/2.0/UDP 127.0.0.1:{self.port};rport;branch=z9hG4bK{secrets.token_hex(8)}",
            "Max-Forwards: 70",
            f"Call-ID: {callID}",
            *headers,
            f"Content-Length: {len(body)}",
            "",
            "",
        ]
        d: Deferred[Response] = Deferred()
        self.waiting[callID] = d
        assert self.transport is not None
        self.transport.write("\r\n".join(lines).encode() + body, ("127.0.0.1", target))
        return d

    def register(
        self, user: str, target: int, expires: int = 3600, cseq: int = 1
    ) -> Deferred[Response]:
        """REGISTER C{user}@example.test with contact C{sip:user@127.0.0.1:PORT}."""
        aor = f"sip:{user}@{DOMAIN}"
        return self.request(
            "REGISTER",
            f"sip:{DOMAIN}",
            target,
            [
                f"From: <{aor}>;tag={secrets.token_hex(4)}",
                f"To: <{aor}>",
                f"CSeq: {cseq} REGISTER",
                f"Contact: <{self.contactOf(user)}>",
                f"Expires: {expires}",
                "User-Agent: dmq-bus-interop-phone",
            ],
        )

    def contactOf(self, user: str) -> str:
        return f"sip:{user}@127.0.0.1:{self.port}"

    def options(self, target: int) -> Deferred[Response]:
        return self.request(
            "OPTIONS",
            f"sip:127.0.0.1:{target}",
            target,
            [
                f"From: <sip:probe@127.0.0.1>;tag={secrets.token_hex(4)}",
                f"To: <sip:127.0.0.1:{target}>",
                "CSeq: 1 OPTIONS",
            ],
        )

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        try:
            message = parseMessage(data)
        except Exception:
            log.failure("unparsable datagram from {addr}", addr=addr)
            return
        if not isinstance(message, Response) or not message.isFinal:
            return
        callID = message.headers.get("call-id") or ""
        d = self.waiting.pop(callID, None)
        if d is not None:
            d.callback(message)


class UsrlocInteropTests(TestCase):
    """Registrations on Kamailio 5.6.3 observed by a dmq-bus node over UDP."""

    timeout = 60
    skip = None if kamailioAvailable() else SKIP_REASON

    def setUp(self) -> None:
        self.base = tempfile.mkdtemp(prefix="dmqu-")
        self.addCleanup(shutil.rmtree, self.base, True)
        self.ports = allocatePorts(2)
        self.clock: IReactorTime = reactor  # type: ignore[assignment]
        self.phone = SIPPhone()
        listening = reactor.listenUDP(0, self.phone, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(listening.stopListening)

    def kamailio(self, port: int) -> KamailioNode:
        node = UsrlocKamailioNode(port, baseDir=self.base)
        self.addCleanup(node.stop)
        node.start()
        return node

    def dmqBus(self, port: int, seed: int) -> tuple[DMQService, UsrlocObserver, list[Observation]]:
        config = BusConfig(
            serverAddress=SIPURI.parse(f"sip:127.0.0.1:{port}"),
            notificationAddresses=(SIPURI.parse(f"sip:127.0.0.1:{seed}"),),
        )
        service = DMQService(NodeConfig(bus=config), reactor)
        observer = UsrlocObserver(self.clock)
        seen: list[Observation] = []
        observer.addObserver(seen.append)
        service.bus.registerPeer(observer)
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        return service, observer, seen

    @inlineCallbacks
    def joinedPair(self) -> Any:
        """A Kamailio node and a dmq-bus node seeded with it, both active."""
        k, ours = self.ports
        node = self.kamailio(k)
        service, observer, seen = self.dmqBus(ours, k)
        yield waitFor(lambda: bothActive(service, node), 15)
        return node, service, observer, seen

    @staticmethod
    def contacts(seen: list[Observation], kind: type[Contact | ContactRemove]) -> list[Any]:
        return [o.item for o in seen if type(o.item) is kind]

    @inlineCallbacks
    def test_registrationObserved(self) -> Any:
        """
        A REGISTER that Kamailio answers 200 reaches the dmq-bus observer as
        a contact update with the AoR, contact, Call-ID, user agent and an
        absolute expiry; an unREGISTER (Expires: 0) as a removal of the same
        contact; Kamailio answers OPTIONS and core.version afterwards.
        """
        node, _, observer, seen = yield self.joinedPair()
        start = self.clock.seconds()
        response = yield self.phone.register("alice", node.port, expires=600)
        self.assertEqual((response.code, response.reason), (200, "OK"))
        yield waitFor(lambda: bool(self.contacts(seen, Contact)), 10)
        log.info("interop usrloc: REGISTER observed in {s:.3f} s", s=self.clock.seconds() - start)
        [contact] = self.contacts(seen, Contact)
        self.assertEqual(contact.aor, f"alice@{DOMAIN}")
        self.assertEqual(contact.contact, self.phone.contactOf("alice"))
        self.assertEqual(contact.userAgent, "dmq-bus-interop-phone")
        self.assertEqual(contact.cseq, 1)
        self.assertTrue(contact.ruid)
        self.assertTrue(contact.callid)
        self.assertTrue(start + 590 < contact.expires < start + 610, contact.expires - start)

        response = yield self.phone.register("alice", node.port, expires=0, cseq=2)
        self.assertEqual(response.code, 200)
        yield waitFor(lambda: bool(self.contacts(seen, ContactRemove)), 10)
        [removed] = self.contacts(seen, ContactRemove)
        self.assertEqual((removed.aor, removed.ruid), (contact.aor, contact.ruid))
        self.assertEqual(removed.contact, contact.contact)

        response = yield self.phone.options(node.port)
        self.assertEqual(response.code, 200)
        self.assertIn("kamailio", node.rpc("core.version").lower())
        self.assertTrue(node.running)
        self.assertEqual(observer.counts().get("update"), 1)
        self.assertEqual(observer.counts().get("remove"), 1)
        counters = observer.counters
        self.assertEqual(counters["usrloc.in.bad_request"] + counters["usrloc.in.errors"], 0)
        summary = observer.summary()
        self.assertEqual(summary["answers"].keys(), {"200"})
        self.assertIn(f"alice@{DOMAIN}", [o["item"].get("aor") for o in summary["recent"]])

    @inlineCallbacks
    def test_syncBringsABatch(self) -> Any:
        """
        Asked for a sync ({"action":3}) by the dmq-bus node, Kamailio sends
        back its two registered contacts in one {"multi":...} batch, which
        the observer reads as two batched contact updates; Kamailio's own
        sync request on joining (if it reached us) was answered 200.
        """
        node, service, observer, seen = yield self.joinedPair()
        for user in ("bob", "carol"):
            response = yield self.phone.register(user, node.port)
            self.assertEqual(response.code, 200)
        yield waitFor(lambda: len(self.contacts(seen, Contact)) == 2, 10)
        kamailio = next(n for n in service.bus.nodes() if n.uri.port == node.port)
        delivery = yield service.bus.send("usrloc", kamailio, b'{"action":3}', "application/json")
        self.assertEqual(delivery.code, 200)
        yield waitFor(lambda: observer.counters["usrloc.in.batches"] >= 1, 10)
        batched = [o.item for o in seen if o.batched]
        self.assertEqual(
            sorted((c.aor, c.contact) for c in batched),
            [(f"{u}@{DOMAIN}", self.phone.contactOf(u)) for u in ("bob", "carol")],
        )
        self.assertTrue(all(type(c) is Contact for c in batched))
        self.assertEqual(observer.counters["usrloc.in.bad_request"], 0)
        self.assertEqual(set(observer.summary()["answers"]), {"200"})
        self.assertTrue(node.running)
