"""
C{dmq-ctl}, the kamcmd-like client of the control API: argument
conversion, output formats, and exit statuses, run as a real subprocess
against a real control service on 127.0.0.1.
"""

# Twisted's assert* methods carry no annotations: calling them is fine here.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import io
import json
import os
import socket
import sys
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

import dmq_bus
from dmq_bus import ctl
from dmq_bus.control import ControlAPI, ControlService
from dmq_bus.ctl import (
    DEFAULT_URL,
    EXIT_OK,
    EXIT_RPC_ERROR,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    convertArgument,
    formatNodeTable,
    formatResult,
)

from .test_control import MemoryHashTable, MemoryHashTables, makeBus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(dmq_bus.__file__)))

NODES = [
    {
        "host": "127.0.0.1",
        "port": "27133",
        "proto": "*",
        "resolved_ip": "127.0.0.1",
        "status": "active",
        "last_notification": 1_700_000_000,
        "local": 0,
    },
    {
        "host": "127.0.0.1",
        "port": "5060",
        "proto": "tcp",
        "resolved_ip": "127.0.0.1",
        "status": "pending",
        "last_notification": 0,
        "local": 1,
    },
]


class TTYStream(io.StringIO):
    """A captured stdout that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def closedPort() -> int:
    """A 127.0.0.1 TCP port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def runMain(*argv: str, stdout: io.StringIO | None = None) -> tuple[int, str, str]:
    """Run C{main(argv)} in this process; (status, stdout, stderr)."""
    out = stdout if stdout is not None else io.StringIO()
    err = io.StringIO()
    status = ctl.main(list(argv), stdout=out, stderr=err)
    return status, out.getvalue(), err.getvalue()


class ArgumentTests(SynchronousTestCase):
    """Arguments are sent as kamcmd sends them."""

    def test_integers(self) -> None:
        """Arguments that look like integers, negative ones too, are sent as integers."""
        self.assertEqual(
            [convertArgument(a) for a in ["42", "-5", "+7", "0"]],
            [42, -5, 7, 0],
        )

    def test_strings(self) -> None:
        """Anything else stays a string; s: forces a string and is removed."""
        self.assertEqual(
            [convertArgument(a) for a in ["kv", "1.5", "0x10", "", "s:42", "s:", "s:s:x"]],
            ["kv", "1.5", "0x10", "", "42", "", "s:x"],
        )


class FormatTests(SynchronousTestCase):
    """What dmq-ctl prints."""

    def test_nodeTable(self) -> None:
        """Nodes print as a table: a header, aligned columns, local marked, times readable."""
        table = formatNodeTable(NODES)
        lines = table.splitlines()
        self.assertTrue(table.endswith("\n"))
        self.assertEqual(len(lines), 3)
        self.assertEqual(
            lines[0].split(),
            ["HOST", "PORT", "PROTO", "RESOLVED", "IP", "STATUS", "LAST", "NOTIFICATION", "LOCAL"],
        )
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(1_700_000_000))
        self.assertEqual(
            lines[1].split(),
            ["127.0.0.1", "27133", "*", "127.0.0.1", "active", *stamp.split()],
        )
        self.assertEqual(
            lines[2].split(), ["127.0.0.1", "5060", "tcp", "127.0.0.1", "pending", "-", "yes"]
        )
        # every column starts at the same offset on every line
        for title in ["PORT", "STATUS", "LAST NOTIFICATION"]:
            column = lines[0].index(title)
            self.assertTrue(all(line[column - 2 : column] == "  " for line in lines), title)
            self.assertTrue(all(line[column] != " " for line in lines), title)

    def test_emptyTable(self) -> None:
        """No nodes prints the header alone."""
        self.assertEqual(len(formatNodeTable([]).splitlines()), 1)

    def test_tableOnlyOnTerminal(self) -> None:
        """dmq.list_nodes is a table on a terminal and JSON (indent 2) elsewhere."""
        self.assertEqual(formatResult("dmq.list_nodes", NODES, tty=True), formatNodeTable(NODES))
        self.assertEqual(
            formatResult("dmq.list_nodes", NODES, tty=False), json.dumps(NODES, indent=2) + "\n"
        )

    def test_otherResultsJSON(self) -> None:
        """Other results print as JSON with indent 2, also on a terminal."""
        self.assertEqual(
            formatResult("htable.sets", "Ok. Key set to new value.", tty=True),
            '"Ok. Key set to new value."\n',
        )
        self.assertEqual(formatResult("dmq.stats", {"a": 1}, tty=True), '{\n  "a": 1\n}\n')


class UsageTests(SynchronousTestCase):
    """Usage errors exit 2 before anything is sent."""

    def test_noMethod(self) -> None:
        """Without a method dmq-ctl prints its usage and exits 2."""
        status, _, err = runMain()
        self.assertEqual(status, EXIT_USAGE)
        self.assertIn("usage: dmq-ctl", err)
        self.assertIn("METHOD is required", err)

    def test_badOptions(self) -> None:
        """An unknown option, a bad timeout or a non-HTTP URL exit 2 with a message."""
        for argv in [
            ["--nope", "dmq.list_nodes"],
            ["--timeout", "0", "dmq.list_nodes"],
            ["--timeout", "soon", "dmq.list_nodes"],
            ["--url", "127.0.0.1:8060", "dmq.list_nodes"],
        ]:
            status, out, err = runMain(*argv)
            self.assertEqual((status, out), (EXIT_USAGE, ""), argv)
            self.assertIn("dmq-ctl", err, argv)

    def test_help(self) -> None:
        """--help prints the usage, the default URL and the exit statuses, and exits 0."""
        status, out, _ = runMain("--help")
        self.assertEqual(status, EXIT_OK)
        self.assertIn(DEFAULT_URL, out)
        self.assertIn("3 unreachable", out)

    def test_defaultURL(self) -> None:
        """The default URL is the control API's default endpoint."""
        self.assertEqual(DEFAULT_URL, "http://127.0.0.1:8060/RPC")

    def test_connectionRefused(self) -> None:
        """Nothing listening at the URL exits 3 with a message naming the URL."""
        url = f"http://127.0.0.1:{closedPort()}/RPC"
        status, out, err = runMain("--url", url, "dmq.list_nodes")
        self.assertEqual((status, out), (EXIT_UNREACHABLE, ""))
        self.assertIn(f"cannot connect to {url}", err)


class CommandLineTests(TestCase):
    """dmq-ctl as a subprocess against a real control service on 127.0.0.1."""

    def setUp(self) -> None:
        network, nodes = makeBus(2)
        self.kv = MemoryHashTable("kv", network.clock)
        api = ControlAPI(nodes[0].bus, MemoryHashTables(self.kv), nodes[0].stack.stats)
        self.service = ControlService(api, "tcp:0:interface=127.0.0.1", reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)

    @inlineCallbacks
    def url(self, path: str = "/RPC") -> Any:
        port = yield self.service.whenListening()
        return f"http://127.0.0.1:{port.getHost().port}{path}"

    @inlineCallbacks
    def dmqctl(self, *args: str, url: str | None = None) -> Any:
        """Run C{python -m dmq_bus.ctl --url URL ARGS}; (stdout, stderr, status)."""
        if url is None:
            url = yield self.url()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
        out, err, status = yield getProcessOutputAndValue(
            sys.executable,
            ["-m", "dmq_bus.ctl", "--url", url, *args],
            env=env,
            path=ROOT,
            reactor=reactor,
        )
        return out.decode("utf-8"), err.decode("utf-8"), status

    @inlineCallbacks
    def test_listNodes(self) -> Any:
        """dmq.list_nodes prints Kamailio's node entries as JSON (not a terminal) and exits 0."""
        out, err, status = yield self.dmqctl("dmq.list_nodes")
        self.assertEqual((status, err), (EXIT_OK, ""))
        nodes = json.loads(out)
        self.assertEqual([n["port"] for n in nodes], ["27133", "27132"])
        self.assertEqual(out, json.dumps(nodes, indent=2) + "\n")

    @inlineCallbacks
    def test_setAndGet(self) -> Any:
        """htable.sets stores a value and htable.get prints it back, as with kamcmd."""
        out, _, status = yield self.dmqctl("htable.sets", "kv", "color", "blue")
        self.assertEqual((status, json.loads(out)), (EXIT_OK, "Ok. Key set to new value."))
        out, _, status = yield self.dmqctl("htable.get", "kv", "color")
        self.assertEqual(status, EXIT_OK)
        self.assertEqual(json.loads(out)["item"]["value"], "blue")

    @inlineCallbacks
    def test_integerArguments(self) -> Any:
        """A negative number is sent as an integer; s:42 is sent as the string 42."""
        _, err, status = yield self.dmqctl("htable.seti", "kv", "n", "-5")
        self.assertEqual((status, err), (EXIT_OK, ""))
        self.assertEqual(self.kv.get("n"), -5)
        yield self.dmqctl("htable.sets", "kv", "zip", "s:02134")
        self.assertEqual(self.kv.get("zip"), "02134")

    @inlineCallbacks
    def test_rpcError(self) -> Any:
        """A method error prints 'error: CODE - MESSAGE' on stderr, as kamcmd, and exits 1."""
        out, err, status = yield self.dmqctl("htable.get", "kv", "missing")
        self.assertEqual((status, out), (EXIT_RPC_ERROR, ""))
        self.assertEqual(err, "error: 500 - Key name doesn't exist in htable.\n")

    @inlineCallbacks
    def test_unknownMethod(self) -> Any:
        """An unknown method exits 1 with Kamailio's 'Method Not Found'."""
        _, err, status = yield self.dmqctl("no.such_method")
        self.assertEqual((status, err), (EXIT_RPC_ERROR, "error: 500 - Method Not Found\n"))

    @inlineCallbacks
    def test_errorData(self) -> Any:
        """An error's detail, when there is one, is printed on the next line."""
        _, err, status = yield self.dmqctl("htable.seti", "kv", "n", "notanumber")
        self.assertEqual(status, EXIT_RPC_ERROR)
        self.assertTrue(err.startswith("error: -32602 - Invalid params: value must be an integer"))

    @inlineCallbacks
    def test_connectionRefused(self) -> Any:
        """Nothing listening exits 3 with a message naming the URL."""
        url = f"http://127.0.0.1:{closedPort()}/RPC"
        out, err, status = yield self.dmqctl("dmq.list_nodes", url=url)
        self.assertEqual((status, out), (EXIT_UNREACHABLE, ""))
        self.assertIn(url, err)
        self.assertIn("Connection refused", err)

    @inlineCallbacks
    def test_usage(self) -> Any:
        """No method is a usage error: exit 2, usage on stderr."""
        url = yield self.url()
        out, err, status = yield getProcessOutputAndValue(
            sys.executable, ["-m", "dmq_bus.ctl", "--url", url], path=ROOT, reactor=reactor
        )
        self.assertEqual((status, out), (EXIT_USAGE, b""))
        self.assertIn(b"usage: dmq-ctl", err)

    @inlineCallbacks
    def test_notTheAPI(self) -> Any:
        """A URL that is not the API (HTTP 404) exits 3 saying so."""
        url = yield self.url("/nope")
        _, err, status = yield self.dmqctl("dmq.list_nodes", url=url)
        self.assertEqual(status, EXIT_UNREACHABLE)
        self.assertIn("HTTP 404", err)

    @inlineCallbacks
    def test_timeout(self) -> Any:
        """A server that never answers exits 3 after --timeout seconds, saying so."""
        factory = ServerFactory()
        factory.protocol = Protocol
        silent = yield reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(silent.stopListening)
        url = f"http://127.0.0.1:{silent.getHost().port}/RPC"
        started = time.monotonic()
        _, err, status = yield self.dmqctl("--timeout", "0.5", "dmq.list_nodes", url=url)
        self.assertEqual(status, EXIT_UNREACHABLE)
        self.assertIn(f"no answer from {url} within 0.5 s", err)
        self.assertLess(time.monotonic() - started, 10)

    @inlineCallbacks
    def test_tableOnTerminal(self) -> Any:
        """On a terminal dmq.list_nodes prints the table; --json forces JSON."""
        url = yield self.url()
        tty = TTYStream()
        status = yield deferToThread(ctl.main, ["--url", url, "dmq.list_nodes"], tty, io.StringIO())
        self.assertEqual(status, EXIT_OK)
        lines = tty.getvalue().splitlines()
        self.assertTrue(lines[0].startswith("HOST"))
        self.assertEqual(lines[2].split()[-1], "yes")
        forced = TTYStream()
        status = yield deferToThread(
            ctl.main, ["--url", url, "--json", "dmq.list_nodes"], forced, io.StringIO()
        )
        self.assertEqual(len(json.loads(forced.getvalue())), 2)
