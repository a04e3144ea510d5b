"""
The config file (C{--config dmq.toml}): the same keys as the long options,
options on the command line winning over it, and errors that name the line.
"""

# Twisted's assert* methods carry no annotations: calling them is fine here.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import re
from pathlib import Path

from twisted.logger import LogLevel
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from dmq_bus import tap
from dmq_bus.bus.dispatch import BusConfig
from dmq_bus.config import SETTINGS, ConfigError, parseConfig
from dmq_bus.interfaces import IHashTables
from dmq_bus.service import DMQService

from .certificates import Authority

EXAMPLE = Path(__file__).parent.parent / "examples" / "dmq.toml"

EVERY_KEY = """\
server-address = "sip:127.0.0.2:5070;transport=tcp"
notification-address = ["sip:127.0.0.1:5060;transport=tcp", "sip:127.0.0.3:5060;transport=tcp"]
notification-channel = "peers"
multi-notify = 0
ping-interval = 2
ping-timeout = 1.5
health = "on"
probe-interval = 1
probe-timeout = 0.4
indirect-probes = 2
suspicion-timeout = 2
request-timeout = 10
leave-timeout = 1
t1 = 0.25
t2 = 2
max-nodes = 50
max-transactions = 1000
user-agent = ""
htable = ["kv", "cache=autoexpire=60"]
control = "none"
allow-network = ["127.0.0.0/8"]
known-nodes-only = 1
secret-file = "SECRET_PATH"
unsigned-from = ["127.0.0.2/32"]
signature-window = 30
tls-certificate = "TLS_CERTIFICATE"
tls-key = "TLS_KEY"
tls-ca = "TLS_CA"
tls-only = 0
peer = ["echo=probe"]
log-level = "warn"
"""


class ConfigTestCase(SynchronousTestCase):
    def write(self, text: str) -> str:
        path: str = self.mktemp()
        Path(path).write_text(text, encoding="utf-8")
        return path

    def parse(self, text: str, *args: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(["--config", self.write(text), *args])
        return options

    def refused(self, text: str, *args: str) -> str:
        with self.assertRaises(usage.UsageError) as caught:
            self.parse(text, *args)
        return str(caught.exception)


class KeysTests(ConfigTestCase):
    """Every option can be set from the file, under its long name."""

    def test_everyKey(self) -> None:
        """A file setting every key configures the node exactly as the same flags would."""
        secret = self.write("a shared secret of more than 16 bytes\n")
        tls = Authority.create("config CA").issue(self.mktemp(), "127.0.0.2", "node")
        options = self.parse(
            EVERY_KEY.replace("SECRET_PATH", secret)
            .replace("TLS_CERTIFICATE", tls.certificate)
            .replace("TLS_KEY", tls.key)
            .replace("TLS_CA", tls.ca)
        )
        config: BusConfig = options["busConfig"]
        self.assertEqual(str(config.serverAddress), "sip:127.0.0.2:5070;transport=tcp")
        self.assertEqual(
            [str(u) for u in config.notificationAddresses],
            ["sip:127.0.0.1:5060;transport=tcp", "sip:127.0.0.3:5060;transport=tcp"],
        )
        self.assertEqual(
            (config.channel, config.pingInterval, config.pingTimeout, config.requestTimeout),
            ("peers", 2.0, 1.5, 10.0),
        )
        self.assertEqual((config.leaveTimeout, config.maxNodes, config.userAgent), (1.0, 50, None))
        self.assertEqual((options["timers"].t1, options["timers"].t2), (0.25, 2.0))
        self.assertEqual(options["max-transactions"], 1000)
        self.assertEqual([(t.name, t.autoexpire) for t in options["tableSpecs"]], [
            ("kv", 0.0), ("cache", 60.0)
        ])  # fmt: skip
        ((factory, peerOptions),) = options["peerSpecs"]
        self.assertEqual((factory.name, peerOptions), ("echo", "probe"))
        self.assertEqual((options["control"], options["logLevel"]), ("none", LogLevel.warn))
        access = options["busConfig"].access
        self.assertEqual([str(n) for n in access.allowNetworks], ["127.0.0.0/8"])
        self.assertEqual([str(n) for n in access.unsignedFrom], ["127.0.0.2/32"])
        self.assertEqual((access.knownNodesOnly, access.signatureWindow), (True, 30.0))
        self.assertEqual(access.secret, b"a shared secret of more than 16 bytes")
        self.assertEqual(
            (options["tls-certificate"], options["tls-key"], options["tls-ca"]),
            (tls.certificate, tls.key, tls.ca),
        )
        self.assertIsNotNone(options["tlsContexts"])
        self.assertFalse(access.tlsOnly)
        self.assertEqual(set(parseConfig(EVERY_KEY).values), set(SETTINGS))

    def test_tlsOnly(self) -> None:
        """
        tls-only = 1 makes a TLS-only node; on a server address without
        ;transport=tls it is refused, naming the file, line and key.
        """
        tls = Authority.create("config CA").issue(self.mktemp(), "127.0.0.2", "node")
        files = (
            f'tls-certificate = "{tls.certificate}"\ntls-key = "{tls.key}"\n'
            f'tls-ca = "{tls.ca}"\ntls-only = 1\n'
        )
        options = self.parse(f'server-address = "sip:127.0.0.2:5061;transport=tls"\n{files}')
        self.assertTrue(options["busConfig"].access.tlsOnly)
        path = self.write(f'server-address = "sip:127.0.0.2:5061"\n{files}')
        with self.assertRaises(usage.UsageError) as caught:
            tap.Options().parseOptions(["--config", path])
        self.assertIn(
            f"{path}, line 5: tls-only needs a server address with ;transport=tls",
            str(caught.exception),
        )

    def test_defaults(self) -> None:
        """Without flags or file every setting has its documented default, shown in --help."""
        options = tap.Options()
        options.parseOptions([])
        for name, setting in SETTINGS.items():
            self.assertEqual(options[name], setting.default, name)
        self.assertEqual(str(options["busConfig"].serverAddress), "sip:127.0.0.1:5060")
        self.assertEqual([t.name for t in options["tableSpecs"]], ["kv"])
        helpText = str(options)
        self.assertIn("[default: 5.0]", helpText)
        self.assertIn("[default: tcp:8060:interface=127.0.0.1]", helpText)

    def test_singleStringForAList(self) -> None:
        """A repeatable option may be given one string instead of a list."""
        options = self.parse('notification-address = "sip:127.0.0.9:5060"\n')
        self.assertEqual(
            [str(u) for u in options["busConfig"].notificationAddresses], ["sip:127.0.0.9:5060"]
        )

    def test_emptyTableList(self) -> None:
        """htable = [] in the file means no replicated tables, like --htable none."""
        service = tap.makeService(self.parse('htable = []\ncontrol = "none"\n'))
        assert isinstance(service, DMQService)
        self.assertEqual([p.channel for p in service.bus.peers()], ["notification_peer"])


class PrecedenceTests(ConfigTestCase):
    """Flags given on the command line win; the file fills only the rest."""

    def test_flagWins(self) -> None:
        """--ping-interval beats the file's ping-interval; the file's other keys still apply."""
        options = self.parse(
            'ping-interval = 9\nping-timeout = 3\nserver-address = "sip:127.0.0.4:5999"\n',
            "--ping-interval",
            "2",
        )
        config: BusConfig = options["busConfig"]
        self.assertEqual((config.pingInterval, config.pingTimeout), (2.0, 3.0))
        self.assertEqual(str(config.serverAddress), "sip:127.0.0.4:5999")

    def test_flagEqualToDefaultStillWins(self) -> None:
        """A flag given with the default value still overrides the file."""
        options = self.parse("ping-interval = 9\n", "--ping-interval", "5")
        self.assertEqual(options["busConfig"].pingInterval, 5.0)

    def test_repeatedFlagReplacesList(self) -> None:
        """--notification-address on the command line replaces the file's whole list."""
        options = self.parse(
            'notification-address = ["sip:127.0.0.1:5060", "sip:127.0.0.2:5060"]\n',
            "--notification-address",
            "sip:127.0.0.3:5060",
        )
        self.assertEqual(
            [str(u) for u in options["busConfig"].notificationAddresses], ["sip:127.0.0.3:5060"]
        )

    def test_emptyUserAgentFlagWins(self) -> None:
        """--user-agent '' (no header) beats a user-agent set in the file."""
        options = self.parse('user-agent = "mine"\n', "--user-agent", "")
        self.assertIsNone(options["busConfig"].userAgent)


class ErrorTests(ConfigTestCase):
    """A bad file is refused at start with the file, the line and the key."""

    def test_syntaxError(self) -> None:
        """A TOML syntax error names its line and column."""
        path = self.write('server-address = "sip:127.0.0.1:5060"\nping-interval = = 5\n')
        with self.assertRaises(usage.UsageError) as caught:
            tap.Options().parseOptions(["--config", path])
        message = str(caught.exception)
        self.assertIn(f"{path}, line 2, column", message)

    def test_unknownKey(self) -> None:
        """A key that is no option is refused, with its line and the known keys."""
        message = self.refused("# comment\n\nping-interval = 2\nping-intervall = 3\n")
        self.assertIn("line 4: unknown key 'ping-intervall'", message)
        self.assertIn("ping-interval", message)

    def test_table(self) -> None:
        """A [section] is refused as an unknown key on its line: the file is flat."""
        message = self.refused('ping-interval = 2\n[node]\nserver-address = "x"\n')
        self.assertIn("line 2: unknown key 'node'", message)

    def test_wrongTypes(self) -> None:
        """A value of the wrong type or out of range names the key, its line and what it must be."""
        cases = [
            ('ping-interval = "fast"', 'ping-interval must be a number > 0, not "fast"'),
            ("ping-interval = -1", "ping-interval must be a number > 0, not -1"),
            ("ping-interval = true", "ping-interval must be a number > 0, not true"),
            ("max-nodes = 1.5", "max-nodes must be a whole number > 0, not 1.5"),
            ("max-nodes = 0", "max-nodes must be a whole number > 0, not 0"),
            ("multi-notify = 2", "multi-notify must be 0 or 1, not 2"),
            ("server-address = 5060", "server-address must be a string, not 5060"),
            ("htable = [1, 2]", "htable must be a string or a list of strings, not [1, 2]"),
            ('log-level = "loud"', "log-level must be one of debug, info, warn, error, critical"),
        ]
        for line, words in cases:
            message = self.refused(f"# dmq\n\n{line}\n")
            self.assertIn(f"line 3: {words}", message, line)

    def test_badValueOfRightType(self) -> None:
        """A string that is no valid value is refused with the file's line, not a flag name."""
        message = self.refused('\nserver-address = "sip:example.com:5060"\n')
        self.assertIn("line 2: server-address", message)
        self.assertIn("IP literal", message)
        message = self.refused('peer = ["nosuchpeer"]\n')
        self.assertIn("line 1: peer: no peer named 'nosuchpeer'", message)

    def test_missingFile(self) -> None:
        """A file that cannot be read is a usage error naming it."""
        with self.assertRaises(usage.UsageError) as caught:
            tap.Options().parseOptions(["--config", "/nonexistent/dmq.toml"])
        self.assertIn("/nonexistent/dmq.toml: cannot read", str(caught.exception))

    def test_parseConfigRaisesConfigError(self) -> None:
        """The parser on its own raises ConfigError (a ValueError) naming the source."""
        with self.assertRaises(ConfigError) as caught:
            parseConfig("t3 = 1\n", "inline")
        self.assertIn("inline, line 1: unknown key 't3'", str(caught.exception))


class ExampleFileTests(ConfigTestCase):
    """examples/dmq.toml documents every key and works as it is."""

    def test_exampleGivesService(self) -> None:
        """The example file, as shipped, gives a valid node on sip:127.0.0.1:5060."""
        options = tap.Options()
        options.parseOptions(["--config", str(EXAMPLE)])
        service = tap.makeService(options)
        assert isinstance(service, DMQService)
        self.assertEqual(str(service.config.bus.serverAddress), "sip:127.0.0.1:5060")

    def test_everyKeyDocumented(self) -> None:
        """Every setting appears in the example file, each with a comment above it."""
        text = EXAMPLE.read_text(encoding="utf-8")
        for name in SETTINGS:
            self.assertRegex(text, rf"(?m)^(# )?{re.escape(name)} = ", name)

    def test_everyKeyUncommented(self) -> None:
        """With every commented key turned on, the example still gives a valid node."""
        text = EXAMPLE.read_text(encoding="utf-8")
        lines = []
        for line in text.splitlines():
            match = re.match(r"# ([a-z0-9-]+) = ", line)
            # secret-file and tls-* name files that exist only on a real
            # deployment, and unsigned-from needs secret-file
            on = match is not None and match[1] in SETTINGS
            on = on and match is not None and match[1] not in ("secret-file", "unsigned-from")
            on = on and match is not None and not match[1].startswith("tls-")
            lines.append(line[2:] if on else line)
        options = self.parse("\n".join(lines) + "\n")
        self.assertEqual(options["busConfig"].pingInterval, 5.0)
        self.assertEqual(
            [str(u) for u in options["busConfig"].notificationAddresses],
            ["sip:10.0.0.1:5060", "sip:10.0.0.2:5060"],
        )
        service = tap.makeService(options)
        assert isinstance(service, DMQService)
        tables = service.bus.peers()[1]
        assert IHashTables.providedBy(tables)
        self.assertEqual([t.name for t in tables.tables()], ["kv", "cache"])
