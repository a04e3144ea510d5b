"""
How many SIP messages per second the codec handles: parse, serialize,
makeResponse, and the full server round of a KDMQ htable request.

Run from the repository root::

    python bench/sip_codec.py [--duration SECONDS] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):
    # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dmq_bus.sip.message import Request, Response, makeResponse
from dmq_bus.sip.parser import parseMessage

# c-htable-047.sip: a Kamailio 5.6.3 htable KDMQ request, byte for byte.
HTABLE_REQUEST = (
    b"KDMQ sip:htable@127.0.0.1:15062 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:15061;branch=z9hG4bK7028.852bbd46000000000000000000000000.0\r\n"
    b"To: <sip:htable@127.0.0.1:15062>\r\n"
    b"From: <sip:htable@127.0.0.1:15061>;tag=7d6d56aac8e1c2a2e3b4a7393705d530-5f6ae7f0\r\n"
    b"CSeq: 10 KDMQ\r\n"
    b"Call-ID: 0ba827cb2ced0afc-4331@127.0.0.1\r\n"
    b"Content-Length: 76\r\n"
    b"User-Agent: kamailio-dmq-interop\r\n"
    b"Max-Forwards: 1\r\n"
    b"Content-Type: application/json\r\n"
    b"\r\n"
    b'{"action":2,"htname":"kv","cname":"color","type":2,"strval":"blue","mode":1}'
)

# c-htable-049.sip: the 200 OK Kamailio answered it with.
HTABLE_RESPONSE = (
    b"SIP/2.0 200 OK\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:15061;branch=z9hG4bK7028.852bbd46000000000000000000000000.0\r\n"
    b"To: <sip:htable@127.0.0.1:15062>;tag=a32b31e6c6f06a22a3a9930caf67c4c7.2fe88967\r\n"
    b"From: <sip:htable@127.0.0.1:15061>;tag=7d6d56aac8e1c2a2e3b4a7393705d530-5f6ae7f0\r\n"
    b"CSeq: 10 KDMQ\r\n"
    b"Call-ID: 0ba827cb2ced0afc-4331@127.0.0.1\r\n"
    b"Server: kamailio-dmq-interop\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)

TO_TAG = "a32b31e6c6f06a22a3a9930caf67c4c7.2fe88967"
SERVER = [("Server", "kamailio-dmq-interop")]


def _parsedRequest() -> Request:
    request = parseMessage(HTABLE_REQUEST)
    assert isinstance(request, Request)
    return request


def _answer(request: Request) -> Response:
    return makeResponse(request.headers, 200, toTag=TO_TAG, extra=SERVER)


PARSED_REQUEST = _parsedRequest()


def parseRequest() -> None:
    parseMessage(HTABLE_REQUEST)


def serializeRequest() -> None:
    PARSED_REQUEST.toBytes()


def parseResponse() -> None:
    parseMessage(HTABLE_RESPONSE)


def respond() -> None:
    _answer(PARSED_REQUEST).toBytes()


def serverRound() -> None:
    request = parseMessage(HTABLE_REQUEST)
    assert isinstance(request, Request)
    _answer(request).toBytes()


MEASUREMENTS: list[tuple[str, Callable[[], None]]] = [
    ("parse KDMQ htable request", parseRequest),
    ("toBytes of that request", serializeRequest),
    ("parse 200 response", parseResponse),
    ("makeResponse 200 + toBytes", respond),
    ("server round (parse+respond)", serverRound),
]


def _check() -> None:
    """The benchmark measures the real thing: the answer is Kamailio's bytes."""
    assert _parsedRequest().toBytes() == HTABLE_REQUEST
    assert _answer(_parsedRequest()).toBytes() == HTABLE_RESPONSE
    assert parseMessage(HTABLE_RESPONSE).toBytes() == HTABLE_RESPONSE


def measure(operation: Callable[[], None], duration: float, slices: int = 20) -> list[float]:
    """
    Seconds per call of C{operation} in each of C{slices} timed loops that
    together last about C{duration} seconds.
    """
    clock = time.perf_counter
    # size a loop so that one slice takes about duration / slices
    calls = 10
    while True:
        start = clock()
        for _ in range(calls):
            operation()
        elapsed = clock() - start
        if elapsed >= 0.01:
            break
        calls *= 4
    calls = max(1, int(calls * duration / slices / elapsed))
    perCall = []
    for _ in range(slices):
        start = clock()
        for _ in range(calls):
            operation()
        perCall.append((clock() - start) / calls)
    return perCall


def run(duration: float) -> None:
    """
    Print one line per measurement: the median slice (what to expect) and
    the fastest slice (what the code can do when nothing else runs).
    """
    width = max(len(name) for name, _ in MEASUREMENTS)
    header = f"{'measurement':<{width}}  {'messages/s':>10}  {'µs median':>9}  {'µs best':>7}"
    print(header)
    print("-" * len(header))
    for name, operation in MEASUREMENTS:
        perCall = measure(operation, duration)
        median = statistics.median(perCall)
        print(
            f"{name:<{width}}  {1 / median:>10,.0f}  {median * 1e6:>9.2f}  {min(perCall) * 1e6:>7.2f}",
            flush=True,
        )


def profile(duration: float, top: int = 15) -> None:
    profiler = cProfile.Profile()
    deadline = time.perf_counter() + duration
    profiler.enable()
    while time.perf_counter() < deadline:
        for _ in range(100):
            serverRound()
    profiler.disable()
    print(f"cProfile of the server round (parse + makeResponse + toBytes), top {top}:")
    pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(top)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--duration",
        type=float,
        default=2.0,
        help="seconds per measurement (default: %(default)s)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also print the top 15 cProfile entries of the server round",
    )
    options = parser.parse_args(argv)
    _check()
    run(options.duration)
    if options.profile:
        print()
        profile(options.duration)


if __name__ == "__main__":
    main()
