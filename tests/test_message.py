"""
Tests for L{dmq_bus.sip.message} and L{dmq_bus.sip.uri}: the SIP values,
their header store, their serialization and L{makeResponse}.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from dmq_bus.sip.errors import SIPParseError
from dmq_bus.sip.message import (
    COMPACT_FORMS,
    Headers,
    Request,
    Response,
    canonicalName,
    makeResponse,
)
from dmq_bus.sip.parser import parseMessage
from dmq_bus.sip.uri import SIPURI, NameAddr, Via, nameAddrURI, splitCommaValues, splitHostPort
from tests import strategies
from tests.fixtures import captureFiles, loadCapture

KDMQ_HEADERS = Headers.of(
    [
        ("Via", "SIP/2.0/UDP 127.0.0.1:15061;branch=z9hG4bK1"),
        ("To", "<sip:htable@127.0.0.1:15062>"),
        ("From", "<sip:htable@127.0.0.1:15061>;tag=abc"),
        ("CSeq", "10 KDMQ"),
        ("Call-ID", "0ba827cb2ced0afc-4331@127.0.0.1"),
        ("Content-Length", "0"),
        ("Max-Forwards", "1"),
    ]
)


def _request(name: str) -> Request:
    message = parseMessage(loadCapture(name))
    assert isinstance(message, Request), name
    return message


def _responseTo(request: Request) -> tuple[str, Response]:
    """The captured response (file name, message) with the request's Call-ID and branch."""
    callID = request.headers.get("call-id")
    topVia = request.headers.topVia()
    assert topVia is not None
    for path in captureFiles():
        message = parseMessage(path.read_bytes())
        if (
            isinstance(message, Response)
            and message.headers.get("call-id") == callID
            and (via := message.headers.topVia()) is not None
            and via.branch == topVia.branch
        ):
            return path.name, message
    raise AssertionError(f"no captured response to {callID}")


def _kamailioAnswer(request: Request, response: Response) -> Response:
    """What makeResponse builds for C{request} when told what Kamailio chose."""
    toAddr = response.headers.nameAddr("to")
    assert toAddr is not None
    return makeResponse(
        request.headers,
        response.code,
        response.reason,
        toTag=toAddr.tag,
        body=response.body,
        contentType="text/plain",
        extra=[("Server", "kamailio-dmq-interop")],
    )


class HeadersLookupTests(SynchronousTestCase):
    """Header lookups ignore case and accept RFC 3261 compact forms."""

    def test_caseInsensitive(self) -> None:
        """A header can be read under any capitalisation of its name."""
        headers = Headers.of([("Call-ID", "abc")])
        for name in ("Call-ID", "call-id", "CALL-ID", "cAlL-iD"):
            self.assertEqual(headers.get(name), "abc")
            self.assertIn(name, headers)

    def test_compactFormsFindLongNames(self) -> None:
        """Each compact letter finds the header written with its long name, and back."""
        pairs = {
            "v": "Via",
            "f": "From",
            "t": "To",
            "i": "Call-ID",
            "l": "Content-Length",
            "c": "Content-Type",
            "m": "Contact",
            "s": "Subject",
            "k": "Supported",
        }
        for compact, long in pairs.items():
            self.assertEqual(Headers.of([(long, "x")]).get(compact), "x", compact)
            self.assertEqual(Headers.of([(compact.upper(), "y")]).get(long), "y", long)
            self.assertEqual(canonicalName(compact), long.lower())

    def test_compactFormTable(self) -> None:
        """Every compact form maps to a lower-case long name that is itself canonical."""
        for compact, long in COMPACT_FORMS.items():
            self.assertEqual(len(compact), 1)
            self.assertEqual(canonicalName(long.title()), long)

    def test_getAllMixesSpellings(self) -> None:
        """All fields of one header come back in wire order whatever their spelling."""
        headers = Headers.of([("Via", "a"), ("X", "1"), ("v", "b"), ("VIA", "c")])
        self.assertEqual(headers.getAll("via"), ["a", "b", "c"])
        self.assertEqual(headers.getAll("nothere"), [])
        self.assertIsNone(headers.get("nothere"))
        self.assertNotIn("nothere", headers)
        self.assertNotIn(5, headers)

    def test_orderAndSpellingKept(self) -> None:
        """Iterating gives the fields exactly as given, names unnormalised."""
        pairs = [("v", "a"), ("CALL-ID", "b"), ("X-y", "c")]
        headers = Headers.of(pairs)
        self.assertEqual(list(headers), pairs)
        self.assertEqual(len(headers), 3)

    def test_equalityIgnoresIndex(self) -> None:
        """Headers with the same fields are equal and hash alike."""
        self.assertEqual(Headers.of([("A", "1")]), Headers((("A", "1"),)))
        self.assertEqual(hash(Headers.of([("A", "1")])), hash(Headers((("A", "1"),))))
        self.assertNotEqual(Headers.of([("A", "1")]), Headers.of([("a", "1")]))

    def test_cseqAndMaxForwards(self) -> None:
        """CSeq and Max-Forwards are read as numbers, malformed ones as None."""
        self.assertEqual(KDMQ_HEADERS.cseq(), (10, "KDMQ"))
        self.assertEqual(KDMQ_HEADERS.maxForwards(), 1)
        self.assertIsNone(Headers.of([("CSeq", "x KDMQ")]).cseq())
        self.assertIsNone(Headers.of([("CSeq", "10")]).cseq())
        self.assertIsNone(Headers.of([("CSeq", "\u0661 KDMQ")]).cseq())
        self.assertIsNone(Headers().cseq())
        self.assertIsNone(Headers.of([("Max-Forwards", "-1")]).maxForwards())
        self.assertIsNone(Headers.of([("Max-Forwards", "1234567890")]).maxForwards())
        self.assertIsNone(Headers().maxForwards())


class HeadersEditingTests(SynchronousTestCase):
    """The copy-making editors of L{Headers}."""

    def test_replacingKeepsPlaceAndSpelling(self) -> None:
        """Replacing sets the first field in place, keeps its name, drops later ones."""
        headers = Headers.of([("v", "a"), ("X", "1"), ("Via", "b"), ("Y", "2")])
        self.assertEqual(
            list(headers.replacing("VIA", "new")),
            [("v", "new"), ("X", "1"), ("Y", "2")],
        )

    def test_replacingAbsentAppends(self) -> None:
        """Replacing a header that is not there appends it last."""
        headers = Headers.of([("X", "1")])
        self.assertEqual(list(headers.replacing("Y", "2")), [("X", "1"), ("Y", "2")])

    def test_withoutRemovesEverySpelling(self) -> None:
        """Without removes every field of the header, compact forms included."""
        headers = Headers.of([("v", "a"), ("X", "1"), ("Via", "b")])
        self.assertEqual(list(headers.without("via")), [("X", "1")])
        self.assertEqual(list(headers.without("v")), [("X", "1")])
        self.assertEqual(headers.without("nothere"), headers)

    def test_prependingAndAppending(self) -> None:
        """Prepending adds first, appending adds last, the original is unchanged."""
        headers = Headers.of([("X", "1")])
        self.assertEqual(list(headers.prepending("Via", "a")), [("Via", "a"), ("X", "1")])
        self.assertEqual(list(headers.appending("Via", "a")), [("X", "1"), ("Via", "a")])
        self.assertEqual(headers.prepending("Via", "a").get("v"), "a")
        self.assertEqual(list(headers), [("X", "1")])

    def test_editedCopiesAreIndexed(self) -> None:
        """Lookups on an edited copy see the edit."""
        headers = Headers.of([("Via", "a")]).prepending("v", "top").appending("X", "1")
        self.assertEqual(headers.getAll("via"), ["top", "a"])
        self.assertEqual(headers.replacing("x", "2").get("X"), "2")


class ViaTests(SynchronousTestCase):
    """Via values, comma-joined Via fields and the top Via."""

    def test_commaJoinedViaSplit(self) -> None:
        """Comma-joined Via values and repeated Via fields give every hop, top first."""
        headers = Headers.of(
            [
                ("Via", "SIP/2.0/UDP a.example;branch=z9hG4bK1 , SIP/2.0/TCP b:5070"),
                ("To", "<sip:x@y>"),
                ("v", 'SIP/2.0/UDP [::1]:5062;received="1,2";rport'),
            ]
        )
        vias = headers.vias()
        self.assertEqual([v.host for v in vias], ["a.example", "b", "[::1]"])
        self.assertEqual([v.transport for v in vias], ["UDP", "TCP", "UDP"])
        self.assertEqual(vias[2].param("received"), '"1,2"')
        self.assertTrue(vias[2].hasParam("rport"))
        self.assertEqual(vias[2].param("rport"), "")
        topVia = headers.topVia()
        self.assertEqual(topVia, vias[0])
        assert topVia is not None
        self.assertEqual(topVia.branch, "z9hG4bK1")

    def test_noVia(self) -> None:
        """A message without Via has no top Via and no hops."""
        self.assertIsNone(Headers().topVia())
        self.assertEqual(Headers().vias(), [])

    def test_ipv6SentBy(self) -> None:
        """A Via sent-by C{[::1]:5060} keeps the brackets and the port."""
        via = Via.parse("SIP/2.0/UDP [::1]:5060;branch=z9hG4bKx")
        self.assertEqual((via.host, via.port), ("[::1]", 5060))
        self.assertEqual(via.sentBy, ("[::1]", 5060))
        self.assertEqual(str(via), "SIP/2.0/UDP [::1]:5060;branch=z9hG4bKx")

    def test_sentByDefaultPorts(self) -> None:
        """A Via without a port is 5060, or 5061 over TLS; hosts compare in lower case."""
        self.assertEqual(Via.parse("SIP/2.0/UDP Host.Example").sentBy, ("host.example", 5060))
        self.assertEqual(Via.parse("SIP/2.0/tls h").sentBy, ("h", 5061))

    def test_lenientSpacing(self) -> None:
        """Tabs or several spaces between protocol and sent-by are accepted."""
        via = Via.parse("SIP/2.0/UDP\t h:1 ;branch=x")
        self.assertEqual(
            (via.protocol, via.transport, via.host, via.port), ("SIP/2.0", "UDP", "h", 1)
        )
        self.assertEqual(via.branch, "x")

    def test_malformed(self) -> None:
        """Malformed Via values raise SIPParseError."""
        for text in ("", "SIP/2.0/UDP", "SIP/UDP h", "SIP/2.0/UDP h:port", "SIP/2.0/UDP [::1"):
            self.assertRaises(SIPParseError, Via.parse, text)

    def test_withParam(self) -> None:
        """Setting a parameter replaces an earlier one and goes last."""
        via = Via.parse("SIP/2.0/UDP h;rport;branch=b").withParam("RPORT", "5060")
        self.assertEqual(str(via), "SIP/2.0/UDP h;branch=b;RPORT=5060")

    @given(strategies.vias)
    def test_roundTrip(self, via: Via) -> None:
        """Any Via value parses back from its text."""
        self.assertEqual(Via.parse(str(via)), via)

    @given(st.lists(strategies.vias, min_size=1, max_size=4))
    def test_commaJoinedRoundTrip(self, vias: list[Via]) -> None:
        """Any list of Via values joined with commas splits back into the same list."""
        headers = Headers.of([("Via", ", ".join(map(str, vias)))])
        self.assertEqual(headers.vias(), vias)
        self.assertEqual(headers.topVia(), vias[0])


class SIPURITests(SynchronousTestCase):
    """C{sip:} and C{sips:} URIs."""

    def test_full(self) -> None:
        """Every part of a SIP URI is read and written back exactly."""
        text = "sip:alice:secret@example.com:5070;transport=tcp;lr;maddr=10.0.0.1?subject=x"
        uri = SIPURI.parse(text)
        self.assertEqual(uri.user, "alice")
        self.assertEqual(uri.password, "secret")
        self.assertEqual((uri.host, uri.port), ("example.com", 5070))
        self.assertEqual(uri.params, (("transport", "tcp"), ("lr", None), ("maddr", "10.0.0.1")))
        self.assertEqual(uri.headers, "subject=x")
        self.assertEqual(str(uri), text)

    def test_paramsOrderPreserved(self) -> None:
        """URI parameters keep their received order, whatever it is."""
        for text in ("sip:h;b=1;a=2;c", "sip:h;c;a=2;b=1"):
            self.assertEqual(str(SIPURI.parse(text)), text)
        self.assertEqual(
            [k for k, _ in SIPURI.parse("sip:h;z;y=1;x").params],
            ["z", "y", "x"],
        )

    def test_sipsDefaultPort(self) -> None:
        """A C{sips:} URI without port means 5061 over TLS, C{sip:} means 5060 over UDP."""
        sips = SIPURI.parse("sips:node@example.com")
        self.assertEqual((sips.scheme, sips.port, sips.defaultedPort), ("sips", None, 5061))
        self.assertEqual(sips.transport, "tls")
        sip = SIPURI.parse("sip:node@example.com")
        self.assertEqual((sip.port, sip.defaultedPort, sip.transport), (None, 5060, "udp"))
        self.assertEqual(SIPURI.parse("sips:h:6000").defaultedPort, 6000)

    def test_schemeCaseInsensitive(self) -> None:
        """An upper-case C{SIPS:} scheme means the same as C{sips:} and is written back as is."""
        uri = SIPURI.parse("SIPS:node@example.com")
        self.assertEqual((uri.defaultedPort, uri.transport), (5061, "tls"))
        self.assertEqual(str(uri), "SIPS:node@example.com")

    def test_transportParam(self) -> None:
        """C{;transport=} is read in lower case."""
        self.assertEqual(SIPURI.parse("sip:h;transport=TCP").transport, "tcp")

    def test_ipv6Host(self) -> None:
        """An IPv6 host keeps its brackets, with or without a port."""
        uri = SIPURI.parse("sip:notification_peer@[::1]:5060;transport=tcp")
        self.assertEqual((uri.user, uri.host, uri.port), ("notification_peer", "[::1]", 5060))
        self.assertEqual(str(uri), "sip:notification_peer@[::1]:5060;transport=tcp")
        self.assertEqual(SIPURI.parse("sip:[2001:db8::5]").host, "[2001:db8::5]")

    def test_splitHostPort(self) -> None:
        """Host and port split at the right colon, brackets kept."""
        self.assertEqual(splitHostPort("[::1]:5060"), ("[::1]", 5060))
        self.assertEqual(splitHostPort("[::1]"), ("[::1]", None))
        self.assertEqual(splitHostPort("example.com:1"), ("example.com", 1))
        self.assertEqual(splitHostPort("10.0.0.1"), ("10.0.0.1", None))
        for bad in ("", "[::1", "[::1]x", "h:", "h:65536", "h:x", "h:\u0661", "bad host", ":5"):
            self.assertRaises(SIPParseError, splitHostPort, bad)

    def test_notSIP(self) -> None:
        """Other schemes and URIs without a host raise SIPParseError."""
        for text in ("tel:+123", "http://x", "sip:", "sipx:h", "h", "sip:user@"):
            self.assertRaises(SIPParseError, SIPURI.parse, text)

    def test_withParam(self) -> None:
        """Setting a parameter replaces an earlier one of any case and goes last."""
        uri = SIPURI.parse("sip:h;Transport=udp;lr").withParam("transport", "tcp")
        self.assertEqual(str(uri), "sip:h;lr;transport=tcp")

    @given(strategies.sipURIs())
    def test_roundTrip(self, uri: SIPURI) -> None:
        """Any SIP URI parses back from its text."""
        self.assertEqual(SIPURI.parse(str(uri)), uri)


class NameAddrTests(SynchronousTestCase):
    """To/From values with display names and parameters."""

    def test_quotedDisplayWithCommaAndSemicolon(self) -> None:
        """A quoted display name may hold commas and semicolons."""
        text = '"Doe, John; Jr." <sip:john@example.com;transport=tcp>;tag=1'
        addr = NameAddr.parse(text)
        self.assertEqual(addr.display, '"Doe, John; Jr."')
        self.assertEqual(addr.uri.params, (("transport", "tcp"),))
        self.assertEqual(addr.tag, "1")
        self.assertEqual(str(addr), text)

    def test_quotedDisplayWithAngleBrackets(self) -> None:
        """A quoted display name may hold C{<} and C{>} and escaped quotes."""
        text = r'"a <b> \"c\"" <sip:x@y>;tag=2'
        addr = NameAddr.parse(text)
        self.assertEqual(addr.display, r'"a <b> \"c\""')
        self.assertEqual(addr.uri, SIPURI.parse("sip:x@y"))
        self.assertEqual(str(addr), text)

    def test_quotedParamWithSeparators(self) -> None:
        """A quoted header parameter may hold C{;}, C{,} and C{<}."""
        for text in ('<sip:x@y>;note="a;b,c<d";tag=3', 'sip:x@y;note="a;b,c<d";tag=3'):
            addr = NameAddr.parse(text)
            self.assertEqual(addr.params, (("note", '"a;b,c<d"'), ("tag", "3")), text)
            self.assertEqual(str(addr), text)

    def test_tokenDisplay(self) -> None:
        """An unquoted display name of several words is kept."""
        addr = NameAddr.parse("John Doe <sip:j@h>")
        self.assertEqual(addr.display, "John Doe")
        self.assertIsNone(addr.tag)

    def test_addrSpecParamsBelongToHeader(self) -> None:
        """Without angle brackets every parameter is a header parameter."""
        addr = NameAddr.parse("sip:j@h;tag=9;x")
        self.assertFalse(addr.bracketed)
        self.assertEqual(addr.uri.params, ())
        self.assertEqual((addr.tag, addr.params), ("9", (("tag", "9"), ("x", None))))
        self.assertEqual(str(addr), "sip:j@h;tag=9;x")

    def test_withTag(self) -> None:
        """Adding a tag to a To value appends C{;tag=}."""
        addr = NameAddr.parse("<sip:htable@127.0.0.1:15062>").withTag("t1")
        self.assertEqual(str(addr), "<sip:htable@127.0.0.1:15062>;tag=t1")

    def test_unterminated(self) -> None:
        """An unterminated C{<} raises SIPParseError."""
        self.assertRaises(SIPParseError, NameAddr.parse, "<sip:x@y")

    def test_splitCommaValuesRespectsQuotes(self) -> None:
        """Comma splitting leaves commas in quotes and angle brackets alone."""
        self.assertEqual(
            splitCommaValues('"a, b" <sip:x@y;p=1,2>, <sip:z@w> , sip:v@u'),
            ['"a, b" <sip:x@y;p=1,2>', "<sip:z@w>", "sip:v@u"],
        )

    @given(strategies.nameAddrs())
    def test_roundTrip(self, addr: NameAddr) -> None:
        """Any name-addr or addr-spec value parses back from its text."""
        self.assertEqual(NameAddr.parse(str(addr)), addr)


class SerializationTests(SynchronousTestCase):
    """C{toBytes} writes the wire form, Content-Length from the body."""

    def test_contentLengthInBytes(self) -> None:
        """Content-Length counts the bytes of a multi-byte UTF-8 body, not its characters."""
        body = "cname=grün ☃ 𝄞".encode()
        request = Request("KDMQ", SIPURI.parse("sip:htable@h"), KDMQ_HEADERS, body)
        data = request.toBytes()
        self.assertIn(f"Content-Length: {len(body)}\r\n".encode(), data)
        self.assertNotEqual(len(body), len(body.decode()))
        self.assertTrue(data.endswith(b"\r\n\r\n" + body))

    def test_contentLengthInPlace(self) -> None:
        """Content-Length is written where it was, once, whatever it said before."""
        headers = Headers.of([("X", "1"), ("l", "999"), ("Y", "2"), ("Content-Length", "3")])
        data = Response(200, "OK", headers, b"abcd").toBytes()
        self.assertEqual(data, b"SIP/2.0 200 OK\r\nX: 1\r\nl: 4\r\nY: 2\r\n\r\nabcd")

    def test_contentLengthAppended(self) -> None:
        """Without a Content-Length field one is written last."""
        data = Response(200, "OK", Headers.of([("X", "1")])).toBytes()
        self.assertEqual(data, b"SIP/2.0 200 OK\r\nX: 1\r\nContent-Length: 0\r\n\r\n")

    def test_requestLine(self) -> None:
        """A request starts with method, Request-URI and version."""
        request = Request("KDMQ", SIPURI.parse("sips:[::1]"))
        self.assertEqual(request.toBytes(), b"KDMQ sips:[::1] SIP/2.0\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(request.withHeaders(KDMQ_HEADERS).headers, KDMQ_HEADERS)

    def test_undecodableBytesSurvive(self) -> None:
        """Header bytes that are not UTF-8 come back out unchanged."""
        data = b"SIP/2.0 200 OK\r\nX: \xff\xfe caf\xc3\xa9\r\nContent-Length: 0\r\n\r\n"
        self.assertEqual(parseMessage(data).toBytes(), data)

    def test_isFinal(self) -> None:
        """1xx responses are provisional, everything else final."""
        self.assertFalse(Response(100, "Trying").isFinal)
        self.assertTrue(Response(200, "OK").isFinal)


class MakeResponseTests(SynchronousTestCase):
    """L{makeResponse} answers exactly as Kamailio does."""

    def test_notificationPeerJoin(self) -> None:
        """Answering Kamailio's join (a-join-001) gives Kamailio's own 200, byte for byte."""
        request = _request("a-join-001.sip")
        name, response = _responseTo(request)
        self.assertEqual(name, "a-join-004.sip")
        self.assertEqual(_kamailioAnswer(request, response).toBytes(), loadCapture(name))

    def test_notificationPeerPing(self) -> None:
        """Answering Kamailio's ping (b-ping-031) gives Kamailio's own 200, byte for byte."""
        request = _request("b-ping-031.sip")
        name, response = _responseTo(request)
        self.assertEqual(_kamailioAnswer(request, response).toBytes(), loadCapture(name))

    def test_htableWithoutBody(self) -> None:
        """An htable 200 has no Content-Type and C{Content-Length: 0}, as Kamailio's."""
        request = _request("c-htable-047.sip")
        name, response = _responseTo(request)
        self.assertEqual(name, "c-htable-049.sip")
        answer = _kamailioAnswer(request, response)
        self.assertNotIn("content-type", answer.headers)
        self.assertEqual(answer.headers.get("Content-Length"), "0")
        self.assertEqual(answer.toBytes(), loadCapture(name))

    def test_everyKamailioPair(self) -> None:
        """
        Every captured a-join, b-ping and c-htable KDMQ answered by Kamailio
        (no C{rport}, which Kamailio answers with C{received}) is answered
        with Kamailio's bytes.
        """
        checked = 0
        for path in captureFiles():
            if not path.name.startswith(("a-join", "b-ping", "c-htable")):
                continue
            message = parseMessage(path.read_bytes())
            if not isinstance(message, Request) or message.method != "KDMQ":
                continue
            name, response = _responseTo(message)
            self.assertEqual(
                _kamailioAnswer(message, response).toBytes(),
                loadCapture(name),
                f"answer to {path.name} differs from {name}",
            )
            checked += 1
        self.assertEqual(checked, 29)

    def test_keepsExistingToTag(self) -> None:
        """A To that already has a tag keeps it; no second tag is added."""
        headers = KDMQ_HEADERS.replacing("To", "<sip:htable@h>;tag=mine")
        response = makeResponse(headers, 200, toTag="other")
        self.assertEqual(response.headers.get("to"), "<sip:htable@h>;tag=mine")
        for to in ("sip:htable@h ; TAG=mine", "<sip:htable@h>;\ttag=mine"):
            response = makeResponse(KDMQ_HEADERS.replacing("To", to), 200, toTag="other")
            self.assertEqual(response.headers.get("to"), to)

    def test_toTagAdded(self) -> None:
        """A To without a tag gets C{toTag}; a tag inside the URI does not count."""
        headers = KDMQ_HEADERS.replacing("To", "<sip:htable@h;tag=uri>")
        response = makeResponse(headers, 404, toTag="t")
        self.assertEqual(response.headers.get("to"), "<sip:htable@h;tag=uri>;tag=t")
        self.assertEqual(response.reason, "Not Found")

    def test_trying(self) -> None:
        """A 100 Trying never carries a To-tag."""
        response = makeResponse(KDMQ_HEADERS, 100, toTag="t")
        self.assertEqual(response.headers.get("to"), "<sip:htable@127.0.0.1:15062>")
        self.assertEqual(response.reason, "Trying")

    def test_headerSelectionAndOrder(self) -> None:
        """Vias in order, To, From, CSeq, Call-ID, Content-Type, extras, Content-Length."""
        headers = Headers.of(
            [
                ("i", "cid"),
                ("v", "SIP/2.0/UDP a"),
                ("Max-Forwards", "1"),
                ("f", "<sip:a@b>;tag=1"),
                ("t", "<sip:c@d>"),
                ("Via", "SIP/2.0/UDP b"),
                ("CSeq", "10 KDMQ"),
                ("User-Agent", "x"),
            ]
        )
        response = makeResponse(
            headers,
            500,
            "Oops",
            toTag="2",
            body=b"{}",
            contentType="application/json",
            extra=[("Server", "s")],
        )
        self.assertEqual(
            list(response.headers),
            [
                ("v", "SIP/2.0/UDP a"),
                ("Via", "SIP/2.0/UDP b"),
                ("t", "<sip:c@d>;tag=2"),
                ("f", "<sip:a@b>;tag=1"),
                ("CSeq", "10 KDMQ"),
                ("i", "cid"),
                ("Content-Type", "application/json"),
                ("Server", "s"),
                ("Content-Length", "2"),
            ],
        )
        self.assertEqual((response.code, response.reason, response.body), (500, "Oops", b"{}"))

    def test_contentTypeOnlyWithBody(self) -> None:
        """Content-Type is left out when there is no body; unknown codes say Unknown."""
        response = makeResponse(KDMQ_HEADERS, 299, contentType="text/plain")
        self.assertNotIn("Content-Type", response.headers)
        self.assertEqual(response.reason, "Unknown")


class NameAddrURITests(SynchronousTestCase):
    """L{nameAddrURI} finds the URI of a To/From value as L{NameAddr.parse} does."""

    def test_sameAsNameAddr(self) -> None:
        """Every form gives the URI NameAddr.parse gives."""
        for text in [
            "<sip:htable@127.0.0.1:15061>;tag=abc",
            " <sip:htable@127.0.0.1:15061> ",
            "<sip:htable@127.0.0.1:15061>",
            '"Node" <sip:a@127.0.0.1:5060>;tag=x',
            "sip:a@127.0.0.1:5060;tag=x",
            "< sip:a@127.0.0.1:5060 >;tag=x",
        ]:
            self.assertEqual(nameAddrURI(text), NameAddr.parse(text).uri, text)

    def test_raisesAsNameAddr(self) -> None:
        """What NameAddr.parse refuses, nameAddrURI refuses."""
        for text in ["<sip:a@127.0.0.1", "<sip:a@127.0.0.1>;tag;;x", "<sip:a@127.0.0.1>;=x", "<x>"]:
            self.assertRaises(SIPParseError, NameAddr.parse, text)
            self.assertRaises(SIPParseError, nameAddrURI, text)
