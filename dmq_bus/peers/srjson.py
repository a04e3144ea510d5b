"""
Reading a JSON body the way Kamailio 5.6.3's srjson parser does, shared by
the peers that decode Kamailio's JSON channels.
"""

from __future__ import annotations

import json

JSON_SPACE = "".join(chr(c) for c in range(33))
"""What srjson skips before a value: every byte up to and including space."""


def readJSON(body: bytes, decoder: json.JSONDecoder) -> object:
    """
    The first JSON value of C{body}, read with C{decoder}: leading bytes up
    to 0x20 skipped and trailing bytes ignored, as srjson does; bytes that
    are not UTF-8 kept with C{surrogateescape}.

    @raise ValueError: the body is empty, or no JSON value starts it (the
        message says which).
    """
    if not body:
        raise ValueError("empty body")
    text = body.decode("utf-8", "surrogateescape")
    start = len(text) - len(text.lstrip(JSON_SPACE))
    try:
        value, _ = decoder.raw_decode(text, start)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"unparsable JSON: {e}") from None
    return value
