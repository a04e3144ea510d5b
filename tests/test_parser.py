"""
Tests for L{dmq_bus.sip.parser}: bytes in, a SIP message or one
L{SIPParseError} out.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from dmq_bus.sip import parser, uri
from dmq_bus.sip.errors import SIPParseError
from dmq_bus.sip.message import Headers, Message, Request, Response
from dmq_bus.sip.parser import (
    MAX_HEADERS,
    findHeaderEnd,
    parseContentLength,
    parseHead,
    parseMessage,
)
from dmq_bus.sip.uri import SIPURI
from tests import strategies
from tests.fixtures import captureFiles, loadCapture

HTABLE = loadCapture("c-htable-047.sip")
"""A Kamailio htable KDMQ request with a JSON body."""

REQUEST_HEAD = (
    b"KDMQ sip:htable@127.0.0.1:15062 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:15061;branch=z9hG4bK1\r\n"
    b"To: <sip:htable@127.0.0.1:15062>\r\n"
    b"From: <sip:htable@127.0.0.1:15061>;tag=1\r\n"
    b"CSeq: 10 KDMQ\r\n"
    b"Call-ID: c1@127.0.0.1\r\n"
)
"""A request's start line and headers, without Content-Length or the blank line."""


def _parseRequest(data: bytes) -> Request:
    message = parseMessage(data)
    assert isinstance(message, Request), message
    return message


def _parseResponse(data: bytes) -> Response:
    message = parseMessage(data)
    assert isinstance(message, Response), message
    return message


def _parseOrError(data: bytes, stream: bool = False) -> Message | SIPParseError:
    try:
        return parseMessage(data, stream=stream)
    except SIPParseError as e:
        return e


class RoundTripTests(SynchronousTestCase):
    """What the serializer writes, the parser reads back equal."""

    @given(strategies.requests())
    def test_request(self, request: Request) -> None:
        """Any request, with any headers and any body bytes, parses back equal."""
        data = request.toBytes()
        self.assertEqual(parseMessage(data), request)
        self.assertEqual(parseMessage(data, stream=True), request)

    @given(strategies.responses())
    def test_response(self, response: Response) -> None:
        """Any response, with any reason phrase and body, parses back equal."""
        data = response.toBytes()
        self.assertEqual(parseMessage(data), response)
        self.assertEqual(parseMessage(data, stream=True), response)

    def test_everyCapture(self) -> None:
        """
        Every one of the captured messages parses, and serializing it gives
        back exactly the bytes Kamailio (or the fake node) sent.
        """
        files = captureFiles()
        self.assertEqual(len(files), 270)
        failures = []
        for path in files:
            data = path.read_bytes()
            try:
                message = parseMessage(data)
            except SIPParseError as e:
                failures.append(f"{path.name}: does not parse: {e}")
                continue
            if message.toBytes() != data:
                failures.append(f"{path.name}: serializes to different bytes")
        self.assertEqual(failures, [], "\n".join(failures))

    def test_captureKinds(self) -> None:
        """The captures hold KDMQ requests, one MESSAGE request and several responses."""
        kinds: set[str | int] = set()
        for path in captureFiles():
            message = parseMessage(path.read_bytes())
            if isinstance(message, Request):
                kinds.add(message.method)
            else:
                kinds.add(message.code)
        self.assertEqual(kinds, {"KDMQ", "MESSAGE", 200, 400, 404, 500})

    def test_htableRequestFields(self) -> None:
        """A captured htable KDMQ request is read into the expected values."""
        request = _parseRequest(HTABLE)
        self.assertEqual(request.method, "KDMQ")
        self.assertEqual(request.uri, SIPURI("127.0.0.1", 15062, "htable"))
        self.assertEqual(request.headers.cseq(), (10, "KDMQ"))
        self.assertEqual(request.headers.maxForwards(), 1)
        self.assertEqual(request.headers.get("c"), "application/json")
        self.assertEqual(len(request.body), 76)
        self.assertTrue(request.body.startswith(b'{"action":2'))
        topVia = request.headers.topVia()
        assert topVia is not None
        self.assertEqual(topVia.sentBy, ("127.0.0.1", 15061))


class RobustnessTests(SynchronousTestCase):
    """Whatever arrives, the parser answers with a message or a SIPParseError."""

    @given(st.binary(max_size=400))
    def test_garbage(self, data: bytes) -> None:
        """Any bytes at all give a message or a SIPParseError, never another exception."""
        for stream in (False, True):
            self.assertIsInstance(_parseOrError(data, stream), (Request, Response, SIPParseError))

    @given(
        st.lists(
            st.sampled_from([b"\r\n", b"\n", b" ", b":", b";", b"<", b">", b'"', b",", b"\t"])
            | st.sampled_from(
                [b"KDMQ ", b"SIP/2.0", b" 200 ", b"sip:", b"sips:", b"[::1]", b"Via", b"l"]
            )
            | st.sampled_from([b"Content-Length: ", b"9", b"0", b"\xff", b"\xc3\xa9"]),
            max_size=40,
        ).map(b"".join)
    )
    def test_nearlySIP(self, data: bytes) -> None:
        """Bytes made of SIP's own pieces give a message or a SIPParseError."""
        for stream in (False, True):
            self.assertIsInstance(_parseOrError(data, stream), (Request, Response, SIPParseError))

    @given(strategies.messages, st.data())
    def test_truncation(self, message: Message, data: st.DataObject) -> None:
        """Any prefix of a valid message gives a message or a SIPParseError."""
        wire = message.toBytes()
        cut = data.draw(st.integers(min_value=0, max_value=len(wire)))
        for stream in (False, True):
            result = _parseOrError(wire[:cut], stream)
            self.assertIsInstance(result, (Request, Response, SIPParseError))

    @given(strategies.messages, st.data())
    def test_corruption(self, message: Message, data: st.DataObject) -> None:
        """A valid message with one byte changed gives a message or a SIPParseError."""
        wire = bytearray(message.toBytes())
        at = data.draw(st.integers(min_value=0, max_value=len(wire) - 1))
        wire[at] = data.draw(st.integers(min_value=0, max_value=255))
        result = _parseOrError(bytes(wire))
        self.assertIsInstance(result, (Request, Response, SIPParseError))

    def test_everyCapturePrefix(self) -> None:
        """Every prefix of a captured request gives a message or a SIPParseError."""
        for cut in range(len(HTABLE) + 1):
            for stream in (False, True):
                result = _parseOrError(HTABLE[:cut], stream)
                self.assertIsInstance(result, (Request, Response, SIPParseError), cut)


class ContentLengthTests(SynchronousTestCase):
    """Content-Length decides where the body ends, counted in bytes."""

    def test_countedInBytes(self) -> None:
        """A multi-byte UTF-8 body is taken by its byte count, not its character count."""
        body = '{"strval":"grün ☃ 𝄞"}'.encode()
        data = REQUEST_HEAD + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        request = parseMessage(data)
        self.assertEqual(request.body, body)
        self.assertEqual(request.toBytes(), data)

    def test_extraBytesIgnored(self) -> None:
        """In a datagram, bytes beyond Content-Length are not part of the body."""
        request = parseMessage(REQUEST_HEAD + b"Content-Length: 2\r\n\r\nabcdef")
        self.assertEqual(request.body, b"ab")

    def test_compactForm(self) -> None:
        """The compact C{l} form is a Content-Length too."""
        request = parseMessage(REQUEST_HEAD + b"l: 3\r\n\r\nabcdef")
        self.assertEqual(request.body, b"abc")

    def test_missingInDatagram(self) -> None:
        """In a datagram without Content-Length the body is the rest of the datagram."""
        request = parseMessage(REQUEST_HEAD + b"\r\nrest of it")
        self.assertEqual(request.body, b"rest of it")

    def test_largerThanDatagram(self) -> None:
        """
        A Content-Length beyond the end of the datagram is an error that still
        carries the request's headers, so it can be answered with 400.
        """
        data = REQUEST_HEAD + b"Content-Length: 100\r\n\r\nshort"
        e = self.assertRaises(SIPParseError, parseMessage, data)
        self.assertEqual(e.status, 400)
        self.assertIsNotNone(e.headers)
        assert e.headers is not None
        self.assertEqual(e.headers.get("call-id"), "c1@127.0.0.1")
        self.assertEqual(e.offset, len(data) - len(b"short"))

    def test_largerThanDatagramResponse(self) -> None:
        """A response cut short is an error that carries no headers: nobody answers it."""
        data = b"SIP/2.0 200 OK\r\nContent-Length: 10\r\n\r\nabc"
        e = self.assertRaises(SIPParseError, parseMessage, data)
        self.assertIsNone(e.headers)

    def test_bad(self) -> None:
        """A Content-Length that is not a small decimal number is answerable with 400."""
        for value in (b"abc", b"-1", b"+1", b"1.5", b"1 2", b"", b"1234567890", "\u0663".encode()):
            data = REQUEST_HEAD + b"Content-Length: " + value + b"\r\n\r\n"
            e = self.assertRaises(SIPParseError, parseMessage, data)
            self.assertEqual(e.status, 400, value)
            self.assertIsNotNone(e.headers, value)

    def test_parseContentLength(self) -> None:
        """Content-Length values are read with blanks around them; None when absent."""
        self.assertEqual(parseContentLength(" 42 "), 42)
        self.assertIsNone(parseContentLength(None))
        self.assertRaises(ValueError, parseContentLength, "4 2")

    def test_streamRequiresContentLength(self) -> None:
        """On a stream, a message without Content-Length is an answerable error."""
        e = self.assertRaises(SIPParseError, parseMessage, REQUEST_HEAD + b"\r\n", stream=True)
        self.assertIsNotNone(e.headers)
        self.assertEqual(e.status, 400)
        request = parseMessage(REQUEST_HEAD + b"Content-Length: 0\r\n\r\n", stream=True)
        self.assertEqual(request.body, b"")

    def test_streamRequiresEndOfHeaders(self) -> None:
        """On a stream, a header block without its blank line is an error at the end."""
        data = REQUEST_HEAD + b"Content-Length: 0\r\n"
        e = self.assertRaises(SIPParseError, parseMessage, data, stream=True)
        self.assertEqual(e.offset, len(data))


class LenientFramingTests(SynchronousTestCase):
    """Framing variations that RFC 3261 asks receivers to accept."""

    def test_foldedHeaderLines(self) -> None:
        """A header continued on lines starting with blanks is joined with one space."""
        data = (
            REQUEST_HEAD + b"Subject: first\r\n  second\r\n\tthird\r\nX: y\r\n"
            b"Content-Length: 0\r\n\r\n"
        )
        request = parseMessage(data)
        self.assertEqual(request.headers.get("subject"), "first second third")
        self.assertEqual(request.headers.get("x"), "y")

    def test_foldBeforeAnyHeader(self) -> None:
        """A continuation line right after the start line is an error at that line."""
        data = b"KDMQ sip:h SIP/2.0\r\n folded\r\n\r\n"
        e = self.assertRaises(SIPParseError, parseMessage, data)
        self.assertEqual(e.offset, len(b"KDMQ sip:h SIP/2.0\r\n"))

    def test_lfOnly(self) -> None:
        """Lines ending in a bare LF, blank line included, are accepted."""
        crlf = REQUEST_HEAD + b"Content-Length: 4\r\n\r\nbody"
        request = parseMessage(crlf.replace(b"\r\n", b"\n"))
        self.assertEqual(request, parseMessage(crlf))

    def test_lfOnlyBodyWithCRLF(self) -> None:
        """With LF-only headers, a CRLF CRLF inside the body does not end the headers."""
        head = REQUEST_HEAD.replace(b"\r\n", b"\n") + b"Content-Length: 6\n\n"
        request = parseMessage(head + b"a\r\n\r\nb")
        self.assertEqual(request.body, b"a\r\n\r\nb")
        self.assertEqual(findHeaderEnd(head + b"a\r\n\r\nb"), (len(head) - 2, len(head)))

    def test_leadingCRLFs(self) -> None:
        """Empty lines before the start line (keep-alives on a stream) are skipped."""
        data = REQUEST_HEAD + b"Content-Length: 0\r\n\r\n"
        self.assertEqual(parseMessage(b"\r\n\r\n\r\n" + data), parseMessage(data))
        self.assertEqual(parseMessage(b"\r\n" + data, stream=True), parseMessage(data))

    def test_noBlankLineInDatagram(self) -> None:
        """A datagram that ends right after a header line is headers with no body."""
        request = parseMessage(REQUEST_HEAD + b"Max-Forwards: 1")
        self.assertEqual(request.headers.maxForwards(), 1)
        self.assertEqual(request.body, b"")

    def test_noBlankLineAfterLineEnd(self) -> None:
        """
        A datagram that ends with a header line's CRLF (or LF) but no blank
        line is headers with no body too.
        """
        for end in (b"\r\n", b"\n"):
            request = _parseRequest(REQUEST_HEAD + b"Max-Forwards: 1" + end)
            self.assertEqual(request.headers.maxForwards(), 1)
            self.assertEqual(request.body, b"")
        e = self.assertRaises(SIPParseError, parseMessage, REQUEST_HEAD + b"l: 5\r\n")
        self.assertIsNotNone(e.headers)

    def test_blanksAroundColon(self) -> None:
        """Blanks before and after a header's colon are not part of name or value."""
        request = parseMessage(REQUEST_HEAD + b"X-A \t:\t  v  \r\nl:0\r\n\r\n")
        self.assertEqual(request.headers.get("x-a"), "v")

    def test_findHeaderEnd(self) -> None:
        """The header block ends at the first blank line, CRLF or LF style."""
        self.assertEqual(findHeaderEnd(b"A\r\nB: c\r\n\r\nbody"), (7, 11))
        self.assertEqual(findHeaderEnd(b"A\nB: c\n\nbody"), (6, 8))
        self.assertEqual(findHeaderEnd(b"A\r\nB: c\r\n"), (-1, -1))

    def test_parseHead(self) -> None:
        """A header block is read into its start line and fields."""
        startLine, headers = parseHead(b"SIP/2.0 200 OK\r\nv: a\r\nTo: b")
        self.assertEqual(startLine, "SIP/2.0 200 OK")
        self.assertEqual(list(headers), [("v", "a"), ("To", "b")])


class RequestLineTests(SynchronousTestCase):
    """Request lines, methods and Request-URIs."""

    def test_anyTokenMethod(self) -> None:
        """Any token is a method, KDMQ included."""
        for method in ("KDMQ", "OPTIONS", "x-Custom.1!%*_+`'~"):
            request = _parseRequest(f"{method} sip:h SIP/2.0\r\nl: 0\r\n\r\n".encode())
            self.assertEqual(request.method, method)

    def test_badMethod(self) -> None:
        """A method that is not a token is an error at the start of the line."""
        e = self.assertRaises(SIPParseError, parseMessage, b"\r\nKD(MQ sip:h SIP/2.0\r\n\r\n")
        self.assertEqual(e.offset, 2)
        self.assertIn("method", e.reason)

    def test_badRequestLine(self) -> None:
        """A request line without exactly three parts is an error at its start."""
        for line in (b"KDMQ sip:h", b"KDMQ", b"KDMQ sip:h SIP/2.0 extra", b"KDMQ  sip:h"):
            e = self.assertRaises(SIPParseError, parseMessage, line + b"\r\nl: 0\r\n\r\n")
            self.assertEqual(e.offset, 0, line)

    def test_badVersion(self) -> None:
        """A request line whose third part is not SIP/x is an error."""
        e = self.assertRaises(SIPParseError, parseMessage, b"KDMQ sip:h HTTP/1.1\r\n\r\n")
        self.assertIn("version", e.reason)

    def test_tabsBetweenParts(self) -> None:
        """Request line parts separated by other blanks are still read."""
        request = _parseRequest(b"KDMQ\tsip:h  SIP/2.0\r\nl: 0\r\n\r\n")
        self.assertEqual((request.method, request.uri), ("KDMQ", SIPURI("h")))

    def test_nonSIPRequestURI(self) -> None:
        """A Request-URI of another scheme is answerable with 416 Unsupported URI Scheme."""
        e = self.assertRaises(
            SIPParseError, parseMessage, b"KDMQ tel:+1234 SIP/2.0\r\nl: 0\r\n\r\n"
        )
        self.assertEqual(e.status, 416)
        self.assertIsNotNone(e.headers)
        self.assertEqual(e.offset, len(b"KDMQ "))

    def test_badSIPRequestURI(self) -> None:
        """A malformed sip: Request-URI is answerable with 400."""
        e = self.assertRaises(SIPParseError, parseMessage, b"KDMQ sip:h:x SIP/2.0\r\nl: 0\r\n\r\n")
        self.assertEqual(e.status, 400)
        self.assertIsNotNone(e.headers)

    def test_sipsAndIPv6RequestURI(self) -> None:
        """A C{sips:} Request-URI with an IPv6 host and port is read."""
        request = _parseRequest(b"KDMQ sips:dialog@[::1]:5061 SIP/2.0\r\nl: 0\r\n\r\n")
        self.assertEqual(request.uri, SIPURI("[::1]", 5061, "dialog", scheme="sips"))
        self.assertEqual(request.uri.transport, "tls")

    def test_ipv6Via(self) -> None:
        """A Via sent-by C{[::1]:5060} in a message is read with its port."""
        data = b"KDMQ sip:h SIP/2.0\r\nv: SIP/2.0/UDP [::1]:5060;branch=z9hG4bKa\r\nl: 0\r\n\r\n"
        request = parseMessage(data)
        topVia = request.headers.topVia()
        assert topVia is not None
        self.assertEqual(topVia.sentBy, ("[::1]", 5060))
        self.assertEqual(request.toBytes(), data)


class StatusLineTests(SynchronousTestCase):
    """Status lines."""

    def test_reasonWithSpaces(self) -> None:
        """The reason phrase is everything after the code."""
        response = _parseResponse(b"SIP/2.0 202 Accepted DMQ\r\nl: 0\r\n\r\n")
        self.assertEqual((response.code, response.reason), (202, "Accepted DMQ"))

    def test_badStatusLine(self) -> None:
        """A status line without a three-digit code is an error at its start."""
        for line in (b"SIP/2.0", b"SIP/2.0 OK", b"SIP/2.0 2000 OK", b"SIP/2.0 20x OK"):
            e = self.assertRaises(SIPParseError, parseMessage, b"\r\n" + line + b"\r\n\r\n")
            self.assertEqual(e.offset, 2, line)
            self.assertIsNone(e.headers)

    def test_codeOutOfRange(self) -> None:
        """Codes outside 100-699 are errors."""
        for code in (b"099", b"700", b"999"):
            self.assertRaises(SIPParseError, parseMessage, b"SIP/2.0 " + code + b" X\r\n\r\n")


class HeaderLineTests(SynchronousTestCase):
    """Header lines and their limits."""

    def test_badHeaderLine(self) -> None:
        """A header line without a colon is an error at the start of that line."""
        data = REQUEST_HEAD + b"no colon here\r\nl: 0\r\n\r\n"
        e = self.assertRaises(SIPParseError, parseMessage, data)
        self.assertEqual(e.offset, len(REQUEST_HEAD))
        self.assertIn("header", e.reason)

    def test_badHeaderName(self) -> None:
        """A header name that is not a token is an error at the start of its line."""
        for name in (b"Bad Name", b"", b"Via(", "Grün".encode()):
            data = REQUEST_HEAD + name + b": v\r\nl: 0\r\n\r\n"
            e = self.assertRaises(SIPParseError, parseMessage, data)
            self.assertEqual(e.offset, len(REQUEST_HEAD), name)

    def test_offsetCountsBytes(self) -> None:
        """The offset of an error after non-ASCII header text counts bytes."""
        head = REQUEST_HEAD + "Subject: grüße ☃\r\n".encode()
        e = self.assertRaises(SIPParseError, parseMessage, head + b"oops\r\n\r\n")
        self.assertEqual(e.offset, len(head))

    def test_maxHeaders(self) -> None:
        """MAX_HEADERS fields are accepted, one more is an error."""
        start = b"KDMQ sip:h SIP/2.0\r\n"
        fields = b"X: 1\r\n" * (MAX_HEADERS - 1) + b"l: 0\r\n"
        request = parseMessage(start + fields + b"\r\n")
        self.assertEqual(len(request.headers), MAX_HEADERS)
        e = self.assertRaises(SIPParseError, parseMessage, start + b"Y: 2\r\n" + fields + b"\r\n")
        self.assertIn(str(MAX_HEADERS), e.reason)
        self.assertEqual(e.offset, len(start) + len(fields))

    def test_foldedLinesAreNotFields(self) -> None:
        """Continuation lines do not count towards MAX_HEADERS."""
        start = b"KDMQ sip:h SIP/2.0\r\n"
        fields = b"X: 1\r\n more\r\n" * (MAX_HEADERS - 1) + b"l: 0\r\n"
        request = parseMessage(start + fields + b"\r\n")
        self.assertEqual(len(request.headers), MAX_HEADERS)
        self.assertEqual(request.headers.get("x"), "1 more")

    def test_errorText(self) -> None:
        """A parse error reads as its reason and byte offset."""
        e = self.assertRaises(SIPParseError, parseMessage, REQUEST_HEAD + b"bad\r\n\r\n")
        self.assertEqual(str(e), f"malformed header line 'bad' (at byte {len(REQUEST_HEAD)})")


class RememberedValuesTests(SynchronousTestCase):
    """
    The parser remembers header names and Request-URIs it has met, to read
    the next message faster; what it reads must not depend on that.
    """

    @given(strategies.messages)
    def test_fastAndSlowPathAgree(self, message: Message) -> None:
        """Header lines read with remembered names equal the same lines read one by one."""
        wire = message.toBytes()
        end, _ = findHeaderEnd(wire)
        head = wire[:end]
        text = head.decode("utf-8", "surrogateescape")
        firstLine = text.find("\n") + 1
        _, headers = parseHead(head)
        self.assertEqual(list(headers), parser._parseHeaderLines(text, firstLine, 0))
        self.assertEqual(parseHead(head)[1], headers)
        for name, _ in headers:
            self.assertEqual(headers.getAll(name), Headers(headers.fields).getAll(name))

    def test_knownNamesLimit(self) -> None:
        """
        Past C{_KNOWN_NAMES_LIMIT} new header names are no longer remembered,
        and messages carrying them still parse.
        """
        self.patch(parser, "_KNOWN_NAMES", {})
        self.patch(parser, "_KNOWN_NAMES_LIMIT", 3)
        fields = b"".join(b"X-%d: %d\r\n" % (i, i) for i in range(10))
        data = b"KDMQ sip:h SIP/2.0\r\n" + fields + b"l: 0\r\n\r\n"
        for _ in range(2):
            request = parseMessage(data)
            self.assertEqual(request.headers.get("x-9"), "9")
            self.assertEqual(len(parser._KNOWN_NAMES), 3)

    def test_knownNameWithoutColon(self) -> None:
        """A line that is only a remembered header name is still malformed."""
        parseMessage(REQUEST_HEAD + b"Content-Length: 0\r\n\r\n")
        e = self.assertRaises(SIPParseError, parseMessage, REQUEST_HEAD + b"CSeq\r\nl: 0\r\n\r\n")
        self.assertEqual(e.offset, len(REQUEST_HEAD))

    def test_parsedURIsLimit(self) -> None:
        """
        Past C{_PARSED_URIS_LIMIT} new URIs are no longer remembered; every
        URI still parses, and a bad one is never remembered.
        """
        self.patch(uri, "_parsedURIs", {})
        self.patch(uri, "_PARSED_URIS_LIMIT", 2)
        for i in range(5):
            self.assertEqual(SIPURI.parse(f"sip:h{i}:5060").host, f"h{i}")
            self.assertEqual(SIPURI.parse(f"sip:h{i}:5060"), SIPURI(f"h{i}", 5060))
        self.assertEqual(len(uri._parsedURIs), 2)
        self.patch(uri, "_PARSED_URIS_LIMIT", 10)
        for _ in range(2):
            self.assertRaises(SIPParseError, SIPURI.parse, "sip:h:x")
        self.assertNotIn("sip:h:x", uri._parsedURIs)


class RememberedLinesTests(SynchronousTestCase):
    """Whole header lines remembered from earlier messages parse as before."""

    def test_repeatedLinesSameHeaders(self) -> None:
        """
        A message parsed again (its repeating lines now remembered) gives
        the same headers as the line-by-line parse, lookups included.
        """
        wire = loadCapture("c-htable-047.sip")
        first = parseMessage(wire)
        second = parseMessage(wire)
        self.assertEqual(second, first)
        for name, _ in second.headers:
            self.assertEqual(
                second.headers.getAll(name), Headers(first.headers.fields).getAll(name)
            )

    def test_perMessageLinesNotRemembered(self) -> None:
        """Via, From, Call-ID and a tagged To line are never remembered."""
        self.patch(parser, "_KNOWN_LINES", {})
        self.patch(parser, "_KNOWN_NAMES", {})
        for _ in range(2):  # the first time teaches the names
            parseMessage(
                b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nTo: <sip:a@h>;tag=1\r\n"
                b"From: <sip:a@h>;tag=2\r\nCall-ID: c\r\nCSeq: 1 KDMQ\r\nl: 0\r\n\r\n"
            )
        self.assertEqual(sorted(parser._KNOWN_LINES), ["CSeq: 1 KDMQ", "l: 0"])

    def test_knownLinesLimit(self) -> None:
        """Past C{_KNOWN_LINES_LIMIT} no new line is remembered; all still parse."""
        self.patch(parser, "_KNOWN_LINES", {})
        self.patch(parser, "_KNOWN_LINES_LIMIT", 2)
        parseMessage(REQUEST_HEAD + b"Content-Length: 0\r\n\r\n")
        for i in range(5):
            request = parseMessage(REQUEST_HEAD + b"X-Count: %d\r\nl: 0\r\n\r\n" % i)
            self.assertEqual(request.headers.get("x-count"), str(i))
        self.assertEqual(len(parser._KNOWN_LINES), 2)
