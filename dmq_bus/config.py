"""
The settings of a node, shared by the command line and the config file.

Every setting has one name, used both as the long flag (C{--ping-interval 2})
and as the key of a TOML config file (C{ping-interval = 2}); see
C{examples/dmq.toml}. A value given on the command line wins over the file,
and the file wins over the default. This module knows the kinds, defaults and
checks of the settings and reads the file; L{dmq_bus.tap} parses the flags.
"""

from __future__ import annotations

import enum
import re
import tomllib
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from dmq_bus.bus.dispatch import DEFAULT_CHANNEL, USER_AGENT
from dmq_bus.bus.guard import DEFAULT_SIGNATURE_WINDOW
from dmq_bus.bus.health import HEALTH_MODES
from dmq_bus.bus.nodelist import DEFAULT_MAX_NODES
from dmq_bus.control import DEFAULT_CONTROL_ENDPOINT
from dmq_bus.logs import LOG_LEVELS
from dmq_bus.sip.transaction import TransactionLimits

DEFAULT_SERVER_ADDRESS = "sip:127.0.0.1:5060"


class Kind(enum.Enum):
    """What values a setting takes, on the command line and in the file."""

    TEXT = "a string"
    NUMBER = "a number"
    INTEGER = "a whole number"
    LIST = "a string or a list of strings"
    SWITCH = "0 or 1"


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file, line and key."""


def _positive(value: float) -> bool:
    return value > 0


@attrs.frozen
class Setting:
    """
    One setting: its name (long flag and config key), its L{Kind}, its
    default, and optionally which values of that kind it accepts
    (C{accepts}) and how to say so (C{expect}, e.g. C{"a number > 0"}).
    """

    name: str
    kind: Kind
    default: Any
    accepts: Callable[[Any], bool] | None = None
    expect: str | None = None

    @property
    def expected(self) -> str:
        """What a value must be, in words."""
        return self.expect or self.kind.value

    def _accept(self, value: Any) -> Any:
        if self.accepts is not None and not self.accepts(value):
            raise ValueError
        return value

    def fromFlag(self, text: str) -> Any:
        """The value of C{--name text}; C{ValueError} naming the flag if bad."""
        try:
            if self.kind is Kind.NUMBER:
                return self._accept(float(text))
            if self.kind is Kind.INTEGER:
                if not text.isdigit():
                    raise ValueError
                return self._accept(int(text))
            if self.kind is Kind.SWITCH:
                if text not in ("0", "1"):
                    raise ValueError
                return text == "1"
            return self._accept(text.lower() if self.name == "log-level" else text)
        except ValueError:
            raise ValueError(f"--{self.name} must be {self.expected}, not {text!r}") from None

    def fromFile(self, value: object) -> Any:
        """The value of C{name = value} in a config file; C{ValueError} if bad."""
        converted: Any
        if isinstance(value, bool):
            converted = value if self.kind is Kind.SWITCH else None
        elif self.kind is Kind.NUMBER and isinstance(value, int | float):
            converted = float(value)
        elif self.kind is Kind.INTEGER and isinstance(value, int):
            converted = value
        elif self.kind is Kind.SWITCH and value in (0, 1):
            converted = bool(value)
        elif self.kind is Kind.TEXT and isinstance(value, str):
            converted = value.lower() if self.name == "log-level" else value
        elif self.kind is Kind.LIST and isinstance(value, str):
            converted = [value]
        elif (
            self.kind is Kind.LIST
            and isinstance(value, list)
            and all(isinstance(v, str) for v in value)
        ):
            converted = list(value)
        else:
            converted = None
        if converted is None or (self.accepts is not None and not self.accepts(converted)):
            raise ValueError(f"must be {self.expected}, not {_toml(value)}")
        return converted


SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in [
        Setting("server-address", Kind.TEXT, DEFAULT_SERVER_ADDRESS),
        Setting("notification-address", Kind.LIST, []),
        Setting("notification-channel", Kind.TEXT, DEFAULT_CHANNEL),
        Setting("multi-notify", Kind.SWITCH, False),
        Setting("ping-interval", Kind.NUMBER, 5.0, _positive, "a number > 0"),
        Setting("ping-timeout", Kind.NUMBER, 5.0, _positive, "a number > 0"),
        Setting("health", Kind.TEXT, "auto", lambda v: v in HEALTH_MODES, "auto, on or off"),
        Setting("probe-interval", Kind.NUMBER, 0.5, _positive, "a number > 0"),
        Setting("probe-timeout", Kind.NUMBER, 0.3, _positive, "a number > 0"),
        Setting("indirect-probes", Kind.INTEGER, 3, lambda n: n >= 0, "a whole number >= 0"),
        Setting("suspicion-timeout", Kind.NUMBER, 1.0, _positive, "a number > 0"),
        Setting("request-timeout", Kind.NUMBER, None, _positive, "a number > 0"),
        Setting("leave-timeout", Kind.NUMBER, 2.0, _positive, "a number > 0"),
        Setting("t1", Kind.NUMBER, 0.5, _positive, "a number > 0"),
        Setting("t2", Kind.NUMBER, 4.0, _positive, "a number > 0"),
        Setting("max-nodes", Kind.INTEGER, DEFAULT_MAX_NODES, _positive, "a whole number > 0"),
        Setting(
            "max-transactions",
            Kind.INTEGER,
            TransactionLimits().maxClientTransactions,
            _positive,
            "a whole number > 0",
        ),
        Setting("user-agent", Kind.TEXT, USER_AGENT),
        Setting("htable", Kind.LIST, ["kv"]),
        Setting("control", Kind.TEXT, DEFAULT_CONTROL_ENDPOINT),
        Setting("allow-network", Kind.LIST, []),
        Setting("known-nodes-only", Kind.SWITCH, False),
        Setting("secret-file", Kind.TEXT, None),
        Setting("unsigned-from", Kind.LIST, []),
        Setting(
            "signature-window", Kind.NUMBER, DEFAULT_SIGNATURE_WINDOW, _positive, "a number > 0"
        ),
        Setting("tls-certificate", Kind.TEXT, None),
        Setting("tls-key", Kind.TEXT, None),
        Setting("tls-ca", Kind.TEXT, None),
        Setting("tls-only", Kind.SWITCH, False),
        Setting("peer", Kind.LIST, []),
        Setting(
            "log-level",
            Kind.TEXT,
            "info",
            lambda name: name in LOG_LEVELS,
            "one of " + ", ".join(LOG_LEVELS),
        ),
    ]
}
"""Every setting, by name, in the order of C{examples/dmq.toml}."""


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, dict):
        return "a table"
    return repr(value)


_SYNTAX_POSITION = re.compile(r"^(?P<reason>.*) \(at line (?P<line>\d+), column (?P<column>\d+)\)$")


@attrs.frozen
class ConfigFile:
    """
    The settings of a config file: C{values} checked and converted, by
    name, and the line each was set on.
    """

    source: str
    values: dict[str, Any]
    lines: dict[str, int | str]

    def where(self, name: str) -> str:
        """C{"dmq.toml, line 4: name"}: where setting C{name} was set, for messages."""
        return f"{self.source}, line {self.lines.get(name, '?')}: {name}"


def parseConfig(text: str, source: str = "config file") -> ConfigFile:
    """
    The settings in the TOML document C{text}. Raises L{ConfigError} for a
    syntax error, an unknown key or a bad value, naming C{source}, the line
    (and column, for syntax errors) and the key.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        match = _SYNTAX_POSITION.match(str(e))
        if match is None:
            raise ConfigError(f"{source}: {e}") from None
        raise ConfigError(
            f"{source}, line {match['line']}, column {match['column']}: {match['reason']}"
        ) from None
    values: dict[str, Any] = {}
    lines: dict[str, int | str] = {}
    for key, value in document.items():
        lines[key] = line = _lineOf(text, key)
        setting = SETTINGS.get(key)
        if setting is None:
            raise ConfigError(
                f"{source}, line {line}: unknown key {key!r} (known keys: {', '.join(SETTINGS)})"
            )
        try:
            values[key] = setting.fromFile(value)
        except ValueError as e:
            raise ConfigError(f"{source}, line {line}: {key} {e}") from None
    return ConfigFile(source, values, lines)


def loadConfig(path: str) -> ConfigFile:
    """L{parseConfig} of the file at C{path}; L{ConfigError} if unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    return parseConfig(text, path)


def _lineOf(text: str, key: str) -> int | str:
    """The line where top-level key (or table) C{key} is defined, or '?'."""
    quoted = rf"(?:{re.escape(key)}|\"{re.escape(key)}\"|'{re.escape(key)}')"
    pattern = re.compile(rf"^\s*(?:{quoted}\s*[=.]|\[+\s*{quoted}\s*[\].])")
    for number, line in enumerate(text.splitlines(), 1):
        if pattern.match(line):
            return number
    return "?"


def merge(given: Mapping[str, Any], fromFile: Mapping[str, Any]) -> dict[str, Any]:
    """
    Every setting's value: from the command line (C{given}: flags not given
    are None or an empty list), else from the file, else the default.
    """
    values = {}
    for name, setting in SETTINGS.items():
        flag = given.get(name)
        if flag is not None and flag != []:
            values[name] = flag
        elif name in fromFile:
            values[name] = fromFile[name]
        else:
            default = setting.default
            values[name] = list(default) if isinstance(default, list) else default
    return values
