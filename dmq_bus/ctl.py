"""
C{dmq-ctl}: call one method of a node's control API, like Kamailio's
C{kamcmd}.

    dmq-ctl dmq.list_nodes
    dmq-ctl htable.sets kv color blue
    dmq-ctl htable.seti kv hits 42
    dmq-ctl htable.sets kv zip s:02134      # s: keeps a number a string
    dmq-ctl --url http://127.0.0.1:8061/RPC dmq.stats

Arguments that look like integers are sent as JSON integers, as kamcmd
does; prefix one with C{s:} to send it as a string. The result is printed
as JSON (indent 2); C{dmq.list_nodes} on a terminal prints an aligned table
instead (C{--json} forces JSON).

Exit status: 0 success; 1 the method answered an error (C{error: CODE -
MESSAGE} on stderr, as kamcmd prints it); 2 usage error; 3 the API could not
be reached or did not answer JSON-RPC.

Standard library only (no Twisted), so it starts fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

DEFAULT_URL = "http://127.0.0.1:8060/RPC"
"""Where the control API listens by default (see L{dmq_bus.control})."""

DEFAULT_TIMEOUT = 10.0
"""Seconds to wait for the connection and for the answer."""

MAX_RESPONSE = 64 * 1024 * 1024
"""Most bytes of a response read; a larger one is an error (exit 3)."""

EXIT_OK = 0
EXIT_RPC_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

_INTEGER = re.compile(r"[+-]?[0-9]+\Z")

NODE_COLUMNS = (
    ("HOST", "host"),
    ("PORT", "port"),
    ("PROTO", "proto"),
    ("RESOLVED IP", "resolved_ip"),
    ("STATUS", "status"),
    ("LAST NOTIFICATION", "last_notification"),
    ("LOCAL", "local"),
)


class Unreachable(Exception):
    """The API could not be reached, or did not answer JSON-RPC."""


class RemoteError(Exception):
    """The method answered a JSON-RPC error."""

    def __init__(self, error: Mapping[str, Any]) -> None:
        super().__init__(error)
        self.error = error

    def __str__(self) -> str:
        code = self.error.get("code", "?")
        message = self.error.get("message", "")
        text = f"error: {code} - {message}"
        data = self.error.get("data")
        if data is not None:
            text += f"\n  {data if isinstance(data, str) else json.dumps(data)}"
        return text


def convertArgument(text: str) -> str | int:
    """
    An argument as kamcmd sends it: an integer when it looks like one,
    the text after C{s:} as a string, else the text as a string.
    """
    if text.startswith("s:"):
        return text[2:]
    if _INTEGER.match(text):
        return int(text)
    return text


def call(url: str, method: str, params: Sequence[object], timeout: float) -> Any:
    """
    POST one JSON-RPC request to C{url}; the result.
    @raise RemoteError: the method answered an error.
    @raise Unreachable: no connection, no answer in time, or not JSON-RPC.
    """
    request = {"jsonrpc": "2.0", "method": method, "params": list(params), "id": 1}
    http = urllib.request.Request(
        url,
        data=json.dumps(request).encode("ascii"),
        headers={"Content-Type": "application/json", "Accept": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(http, timeout=timeout) as response:
            body = response.read(MAX_RESPONSE + 1)
    except urllib.error.HTTPError as e:
        # a JSON-RPC error may come with an HTTP error status (413)
        body = e.read(MAX_RESPONSE + 1)
        answer = _parse(body)
        if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
            raise RemoteError(answer["error"]) from None
        raise Unreachable(f"{url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, TimeoutError):
            raise Unreachable(f"no answer from {url} within {timeout:g} s") from None
        raise Unreachable(f"cannot connect to {url}: {reason}") from None
    except TimeoutError:
        raise Unreachable(f"no answer from {url} within {timeout:g} s") from None
    except OSError as e:
        raise Unreachable(f"cannot talk to {url}: {e}") from None
    if len(body) > MAX_RESPONSE:
        raise Unreachable(f"{url}: response larger than {MAX_RESPONSE} bytes")
    answer = _parse(body)
    if not isinstance(answer, dict) or answer.get("id") != 1:
        raise Unreachable(f"{url} did not answer JSON-RPC: {body[:200]!r}")
    if "error" in answer:
        error = answer["error"]
        raise RemoteError(error if isinstance(error, dict) else {"message": str(error)})
    if "result" not in answer:
        raise Unreachable(f"{url} did not answer JSON-RPC: {body[:200]!r}")
    return answer["result"]


def _parse(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def formatTimestamp(seconds: object) -> str:
    """A C{last_notification} for people: C{-} for 0, else local time."""
    if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds <= 0:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def formatNodeTable(nodes: Sequence[Mapping[str, Any]]) -> str:
    """
    C{dmq.list_nodes}'s result as an aligned table, one node per line,
    with a header; C{last_notification} as local time, C{local} as C{yes}
    or nothing. Ends with a newline.
    """
    rows = [[title for title, _ in NODE_COLUMNS]]
    for node in nodes:
        row = []
        for _, key in NODE_COLUMNS:
            value = node.get(key, "")
            if key == "last_notification":
                row.append(formatTimestamp(value))
            elif key == "local":
                row.append("yes" if value else "")
            else:
                row.append(str(value))
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(NODE_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines) + "\n"


def formatResult(method: str, result: Any, tty: bool) -> str:
    """What to print for C{result}: JSON, or a table for nodes on a terminal."""
    if tty and method == "dmq.list_nodes" and isinstance(result, list):
        if all(isinstance(n, dict) for n in result):
            return formatNodeTable(result)
    return json.dumps(result, indent=2, ensure_ascii=False) + "\n"


def _write(stream: TextIO, text: str) -> None:
    # strings with undecodable bytes (surrogateescape) are written back as bytes
    buffer = getattr(stream, "buffer", None)
    if buffer is not None:
        stream.flush()
        buffer.write(text.encode("utf-8", "surrogateescape"))
        buffer.flush()
    else:
        stream.write(text.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))


def makeParser() -> argparse.ArgumentParser:
    """The command line of C{dmq-ctl}."""
    parser = argparse.ArgumentParser(
        prog="dmq-ctl",
        description="Call one method of a dmq-bus node's control API (JSON-RPC), like kamcmd.",
        epilog=(
            "Arguments that look like integers are sent as integers; prefix s: to send "
            "a string (s:42). Exit status: 0 ok, 1 method error, 2 usage, 3 unreachable."
        ),
    )
    parser.add_argument(
        "--url", default=DEFAULT_URL, help=f"the control API's URL (default {DEFAULT_URL})"
    )
    parser.add_argument(
        "--timeout",
        type=_positive,
        default=DEFAULT_TIMEOUT,
        help=f"seconds to wait for an answer (default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--json", action="store_true", help="print JSON even on a terminal (dmq.list_nodes)"
    )
    parser.add_argument(
        "method",
        nargs="?",
        metavar="METHOD",
        help="e.g. dmq.list_nodes, htable.get, system.listMethods",
    )
    parser.add_argument(
        "args", nargs=argparse.REMAINDER, metavar="ARGS", help="the method's parameters"
    )
    return parser


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def main(
    argv: Sequence[str] | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run C{dmq-ctl} with C{argv} (default: C{sys.argv[1:]}); the exit status."""
    out = sys.stdout if stdout is None else stdout
    err = sys.stderr if stderr is None else stderr
    parser = makeParser()
    try:
        # argparse prints --help and usage errors itself, then exits
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            options = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
            if not options.method:
                parser.error("a METHOD is required, e.g. dmq.list_nodes")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if not options.url.startswith(("http://", "https://")):
        err.write(f"dmq-ctl: --url must be an http:// or https:// URL, not {options.url!r}\n")
        return EXIT_USAGE
    params = [convertArgument(a) for a in options.args]
    try:
        result = call(options.url, options.method, params, options.timeout)
    except RemoteError as e:
        err.write(f"{e}\n")
        return EXIT_RPC_ERROR
    except Unreachable as e:
        err.write(f"dmq-ctl: {e}\n")
        return EXIT_UNREACHABLE
    tty = not options.json and out.isatty()
    _write(out, formatResult(options.method, result, tty))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
