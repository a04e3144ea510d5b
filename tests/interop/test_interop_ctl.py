"""
An operator's view across a mixed bus: keys written with Kamailio's kamcmd
are read with dmq-ctl on a dmq-bus node, and keys written with dmq-ctl are
read with kamcmd; dmq.list_nodes agrees on both sides.

Skipped, loudly, only where Kamailio is not installed.
"""

# Twisted's assert* methods carry no annotations: calling them is fine here.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from dmq_bus.bus.dispatch import BusConfig
from dmq_bus.peers.htable import HTablePeer, TableSpec
from dmq_bus.service import DMQService, NodeConfig
from dmq_bus.sip.uri import SIPURI
from dmq_bus.tap import addControl

from .kamailio import SKIP_REASON, KamailioNode, allocatePorts, kamailioAvailable, waitFor


class DmqCtlInteropTests(TestCase):
    """dmq-ctl on a dmq-bus node beside kamcmd on a Kamailio 5.6.3 node."""

    timeout = 60
    skip = None if kamailioAvailable() else SKIP_REASON

    @inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        base = tempfile.mkdtemp(prefix="dmqc-")
        self.addCleanup(shutil.rmtree, base, True)
        kamPort, ourPort, controlPort = allocatePorts(3)
        self.kamailio = KamailioNode(kamPort, baseDir=base)
        self.addCleanup(self.kamailio.stop)
        self.kamailio.start()
        config = BusConfig(
            serverAddress=SIPURI.parse(f"sip:127.0.0.1:{ourPort}"),
            notificationAddresses=(SIPURI.parse(f"sip:127.0.0.1:{kamPort}"),),
        )
        self.service = DMQService(NodeConfig(bus=config), reactor)
        self.service.bus.registerPeer(HTablePeer(self.service.bus, reactor, [TableSpec("kv")]))
        addControl(self.service, f"tcp:{controlPort}:interface=127.0.0.1")
        self.url = f"http://127.0.0.1:{controlPort}/RPC"
        self.service.startService()
        self.addCleanup(lambda: self.service.running and self.service.stopService())
        self.ourPort = ourPort
        yield waitFor(lambda: self.kamailio.nodeStatuses().get(ourPort) == "active", 10)

    def ctl(self, *args: str) -> Any:
        """Run dmq-ctl in its own process; fires with (stdout, stderr, exit status)."""
        return getProcessOutputAndValue(
            sys.executable,
            ["-m", "dmq_bus.ctl", "--url", self.url, "--json", *args],
            env=dict(os.environ),
        )

    @inlineCallbacks
    def test_kamcmdToDmqCtl(self) -> Any:
        """A string and an integer set with kamcmd are read with dmq-ctl htable.get."""
        self.kamailio.htSets("color", "blue")
        self.kamailio.htSeti("count", 42)
        table = self.service.bus.peers()[1].table("kv")  # type: ignore[attr-defined]
        yield waitFor(lambda: table.get("count") == 42, 5)
        out, err, code = yield self.ctl("htable.get", "kv", "color")
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["item"]["value"], "blue")
        out, err, code = yield self.ctl("htable.get", "kv", "count")
        self.assertEqual(json.loads(out)["item"], {
            "name": "count", "value": 42, "flags": 0, "expire": "NEVER"
        })  # fmt: skip

    @inlineCallbacks
    def test_dmqCtlToKamcmd(self) -> Any:
        """Keys set and deleted with dmq-ctl show up (and go away) on Kamailio."""
        for args in (("htable.sets", "kv", "color", "green"), ("htable.seti", "kv", "n", "7")):
            out, err, code = yield self.ctl(*args)
            self.assertEqual((code, json.loads(out)), (0, "Ok. Key set to new value."), err)
        yield waitFor(lambda: self.kamailio.htGet("n") == 7, 5)
        self.assertEqual(self.kamailio.htGet("color"), "green")
        out, err, code = yield self.ctl("htable.delete", "kv", "color")
        self.assertEqual(code, 0, err)
        yield waitFor(lambda: self.kamailio.htGet("color") is None, 5)

    @inlineCallbacks
    def test_listNodesAgree(self) -> Any:
        """dmq-ctl dmq.list_nodes and Kamailio's dmq.list_nodes list the same two nodes."""
        yield waitFor(lambda: len(self.service.bus.nodes()) == 2, 5)
        out, err, code = yield self.ctl("dmq.list_nodes")
        self.assertEqual(code, 0, err)
        ours = {(n["port"], n["status"], n["local"]) for n in json.loads(out)}
        theirs = {(str(n["port"]), n["status"], int(n["local"])) for n in self.kamailio.listNodes()}
        self.assertEqual({(p, s) for p, s, _ in ours}, {(p, s) for p, s, _ in theirs})
        self.assertEqual({p for p, _, local in ours if local}, {str(self.ourPort)})
        out, err, code = yield self.ctl("htable.get", "kv", "nosuchkey")
        self.assertEqual(code, 1)
        self.assertIn(b"Key name doesn't exist in htable.", err)
