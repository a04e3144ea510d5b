"""
The read-only observers of Kamailio's dialog, usrloc and presence channels:
their decoders on realistic bodies (captured from Kamailio 5.6.3 for usrloc,
built from 5.6.3's code for dialog and presence), their answers to good and
hostile bodies, their bounded record, their subscribers and their plugins.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, cast

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.plugin import IPlugin
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from dmq_bus.bus.values import DMQMessage, Node, NodeStatus, PeerResponse
from dmq_bus.interfaces import IDMQBus, IDMQPeer, IDMQPeerFactory
from dmq_bus.peers.observed import (
    DIALOG_KEYS,
    PRESENCE_KEYS,
    PRESENTITY_KEYS,
    USRLOC_KEYS,
    ChannelCodec,
    ChannelItem,
    ChannelObserver,
    Contact,
    ContactFields,
    ContactRemove,
    Decoded,
    DialogNoop,
    DialogObserver,
    DialogObserverFactory,
    DialogProfile,
    DialogRemove,
    DialogState,
    DialogSync,
    DialogUpdate,
    IObservedChannel,
    Observation,
    ObserverLimits,
    PresenceNoop,
    PresenceObserver,
    PresenceObserverFactory,
    PresenceSync,
    Presentity,
    PresentityUpdate,
    UsrlocNoop,
    UsrlocObserver,
    UsrlocObserverFactory,
    UsrlocSync,
    decodeDialog,
    decodePresence,
    decodeProfiles,
    decodeUsrloc,
    itemDict,
    parseObserverOptions,
    valueBytes,
)
from dmq_bus.sip.address import Address, Origin
from dmq_bus.sip.message import Request
from dmq_bus.sip.parser import parseMessage
from dmq_bus.sip.uri import SIPURI

# -- bodies -----------------------------------------------------------------

PROFILES = json.dumps(
    {
        "profiles": [
            {"name": "calls", "value": "alice", "puid": "5d1c-1", "expires": 1700003600},
            {"name": "active", "flags": 2},
        ]
    },
    separators=(",", ":"),
)

DIALOG_EARLY_UPDATE = (
    b'{"action":1,"h_entry":1234,"h_id":5678,"init_ts":1700000000,'
    b'"callid":"a84b4c76e66710@pc33.example.com",'
    b'"from_uri":"sip:alice@example.com","to_uri":"sip:bob@example.com",'
    b'"req_uri":"sip:bob@192.0.2.4:5060","tag1":"1928301774","cseq1":"314159",'
    b'"route_set1":"<sip:p1.example.com;lr>","contact1":"<sip:alice@192.0.2.1>",'
    b'"vars":{"caller":"alice","room":"caf\xc3\xa9"},'
    b'"profiles":' + json.dumps(PROFILES).encode() + b","
    b'"state":2,"start_ts":1700000001,"lifetime":43200,'
    b'"tag1":"1928301774","cseq1":"314159","route_set1":"<sip:p1.example.com;lr>",'
    b'"contact1":"<sip:alice@192.0.2.1>"}'
)
"""An UPDATE for an early dialog as 5.6.3 writes it: leg-1 keys twice (issue #3656)."""

DIALOG_CONFIRMED_UPDATE = (
    b'{"action":1,"h_entry":7,"h_id":9,"init_ts":1700000000,"callid":"c-2",'
    b'"from_uri":"sip:alice@example.com","to_uri":"sip:bob@example.com",'
    b'"req_uri":"sip:bob@example.com","tag1":"OLD","cseq1":"1","route_set1":"",'
    b'"contact1":"<sip:alice@192.0.2.1>","state":4,"start_ts":1700000005,'
    b'"lifetime":7200,"tag1":"t-a","tag2":"t-b","cseq1":"2","cseq2":"0",'
    b'"route_set1":"","route_set2":"<sip:p2;lr>","contact1":"<sip:alice@192.0.2.1>",'
    b'"contact2":"<sip:bob@192.0.2.4>"}'
)
"""An UPDATE for a confirmed dialog: the second tag1/cseq1 win."""

DIALOG_STATE_CONFIRMED = (
    b'{"action":2,"h_entry":7,"h_id":9,"state":4,"start_ts":1700000005,"lifetime":7200,'
    b'"tag1":"t-a","tag2":"t-b","cseq1":"2","cseq2":"0","route_set1":"",'
    b'"route_set2":"","contact1":"<sip:a@h>","contact2":"<sip:b@h>"}'
)
DIALOG_STATE_DELETED = b'{"action":2,"h_entry":7,"h_id":9,"state":5}'
DIALOG_RM = b'{"action":3,"h_entry":7,"h_id":9,"state":5}'
DIALOG_SYNC = b'{"action":4}'

# Captured from Kamailio 5.6.3 (tests/interop/kamailio-usrloc.cfg, REGISTER
# of alice and bob, then a sync request and an unREGISTER of alice).
USRLOC_ALICE = (
    b'{"action":1,"aor":"alice@example.test","ruid":"uloc-6b0bbfe0-1705-1",'
    b'"c":"sip:alice@127.0.0.1:49098","received":"","path":"",'
    b'"callid":"8085567c8b7eb0e6@127.0.0.1","user_agent":"dmq-bus-interop-phone",'
    b'"instance":"","expires":1795935728,"cseq":1,"flags":0,"cflags":0,"q":-1,'
    b'"last_modified":1795932128,"methods":4294967295,"reg_id":0,"server_id":0}'
)
USRLOC_BOB = USRLOC_ALICE.replace(b"alice", b"bob").replace(b"1705-1", b"1706-1")
USRLOC_MULTI = b'{"multi":{"1":' + USRLOC_ALICE + b',"2":' + USRLOC_BOB + b"}}"
USRLOC_RM = USRLOC_ALICE.replace(b'"action":1', b'"action":2')
USRLOC_SYNC = b'{"action":3}'

ALICE = Contact(
    aor="alice@example.test",
    ruid="uloc-6b0bbfe0-1705-1",
    contact="sip:alice@127.0.0.1:49098",
    received="",
    path="",
    callid="8085567c8b7eb0e6@127.0.0.1",
    userAgent="dmq-bus-interop-phone",
    instance="",
    expires=1795935728,
    cseq=1,
    q=-1,
    lastModified=1795932128,
    methods=4294967295,
)

PRESENCE_UPDATE = (
    b'{"action":1,"presentity":{"domain":"example.com","user":"alice",'
    b'"etag":"a.1700000000.1.2.0","expires":3600,"recv":1700000000,'
    b'"sender":"sip:192.0.2.1:5060","event":"presence"},"t_new":1,'
    b'"cur_etag":"a.1700000000.1.1.0","sphere":"work","ruid":"pres-5d1c-1",'
    b'"body":"<?xml version=\\"1.0\\"?><presence entity=\\"sip:alice@example.com\\"/>"}'
)
PRESENCE_SYNC = b'{"action":2}'


# -- helpers ----------------------------------------------------------------

REQUEST = parseMessage(
    b"KDMQ sip:usrloc@127.0.0.1:5060 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-1\r\n"
    b"To: <sip:usrloc@127.0.0.1:5060>\r\n"
    b"From: <sip:usrloc@127.0.0.1:5070>;tag=1\r\n"
    b"CSeq: 10 KDMQ\r\nCall-ID: 1@127.0.0.1\r\nMax-Forwards: 1\r\n"
    b"Content-Length: 0\r\n\r\n"
)
assert isinstance(REQUEST, Request)

KAMAILIO = Node.fromURI(SIPURI.parse("sip:127.0.0.1:5070"), NodeStatus.ACTIVE)


def message(body: bytes, channel: str = "usrloc", sender: Node | None = KAMAILIO) -> DMQMessage:
    """A DMQMessage for C{body} as the bus would hand it to a peer."""
    assert isinstance(REQUEST, Request)
    return DMQMessage(
        channel=channel,
        body=body,
        contentType="application/json",
        sender=sender,
        maxForwards=1,
        origin=Origin(Address("udp", "127.0.0.1", 5070)),
        request=REQUEST,
    )


def answer(peer: ChannelObserver, body: bytes) -> PeerResponse:
    return peer.messageReceived(message(body, peer.channel))


def aors(items: Iterable[ChannelItem | Observation]) -> list[str | None]:
    """The AoR of every usrloc contact among C{items} (observations or items)."""
    found = []
    for item in items:
        if isinstance(item, Observation):
            item = item.item
        assert isinstance(item, ContactFields), item
        found.append(item.aor)
    return found


def only(decoded: Decoded) -> Any:
    """The one item of C{decoded} (which must not be a 400)."""
    assert decoded.badRequest is None, decoded.badRequest
    [item] = decoded.items
    return item


class StubBus:
    """A bus that only has a clock, and fails the test if anything is sent."""

    def __init__(self) -> None:
        self.clock = Clock()

    def send(self, *args: object, **kwargs: object) -> None:
        raise AssertionError("an observer sent a message")

    broadcast = send


def stubBus() -> IDMQBus:
    return cast(IDMQBus, StubBus())


def hostileJSON(keys: list[str]) -> st.SearchStrategy[object]:
    """Any JSON value, objects keyed by C{keys} among others, nested."""
    return st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(st.sampled_from([*keys, "multi", "x"]), inner, max_size=6)
        ),
        max_leaves=20,
    )


# -- dialog -----------------------------------------------------------------


class DialogDecodingTests(SynchronousTestCase):
    """Dialog bodies as 5.6.3's dialog module writes and reads them."""

    def test_earlyUpdateWithDuplicateKeys(self) -> None:
        """
        An UPDATE for an early dialog, with tag1/cseq1/route_set1/contact1
        written twice as 5.6.3 does, decodes to every field, the variables
        (UTF-8 included) and the profiles read from their JSON string; the
        duplicates are reported, not refused.
        """
        decoded = decodeDialog(DIALOG_EARLY_UPDATE)
        update = only(decoded)
        self.assertEqual(
            update,
            DialogUpdate(
                hEntry=1234,
                hId=5678,
                state=2,
                initTs=1700000000,
                startTs=1700000001,
                lifetime=43200,
                callid="a84b4c76e66710@pc33.example.com",
                fromURI="sip:alice@example.com",
                toURI="sip:bob@example.com",
                reqURI="sip:bob@192.0.2.4:5060",
                tag1="1928301774",
                cseq1="314159",
                routeSet1="<sip:p1.example.com;lr>",
                contact1="<sip:alice@192.0.2.1>",
                profiles=(
                    DialogProfile("calls", "alice", "5d1c-1", expires=1700003600),
                    DialogProfile("active", flags=2),
                ),
                profilesJSON=PROFILES,
                vars=(("caller", "alice"), ("room", "café")),
            ),
        )
        self.assertEqual(decoded.duplicateKeys, ("tag1", "cseq1", "route_set1", "contact1"))
        self.assertEqual(decoded.unknownKeys, ())

    def test_confirmedUpdateLastValueWins(self) -> None:
        """In a confirmed dialog's UPDATE the second tag1 and cseq1 (the state's) win."""
        update = only(decodeDialog(DIALOG_CONFIRMED_UPDATE))
        self.assertIsInstance(update, DialogUpdate)
        self.assertEqual((update.tag1, update.cseq1, update.tag2), ("t-a", "2", "t-b"))
        self.assertEqual((update.state, update.lifetime, update.profiles), (4, 7200, ()))
        self.assertEqual(update.contact2, "<sip:bob@192.0.2.4>")

    def test_stateRemoveSync(self) -> None:
        """STATE (confirmed and deleted), RM and SYNC decode to their own types."""
        self.assertEqual(
            only(decodeDialog(DIALOG_STATE_CONFIRMED)),
            DialogState(
                hEntry=7,
                hId=9,
                state=4,
                startTs=1700000005,
                lifetime=7200,
                tag1="t-a",
                tag2="t-b",
                cseq1="2",
                cseq2="0",
                routeSet1="",
                routeSet2="",
                contact1="<sip:a@h>",
                contact2="<sip:b@h>",
            ),
        )
        self.assertEqual(only(decodeDialog(DIALOG_STATE_DELETED)), DialogState(7, 9, 5))
        self.assertEqual(only(decodeDialog(DIALOG_RM)), DialogRemove(7, 9, 5))
        self.assertEqual(only(decodeDialog(DIALOG_SYNC)), DialogSync())

    def test_noActionIsNothing(self) -> None:
        """
        Action 0, no action, an unknown action, C{{}}, arrays and bare values
        are a no-op as in 5.6.3 (which skips members without a name).
        """
        cases = {
            b'{"action":0}': 0,
            b'{"h_entry":1}': 0,
            b'{"action":9}': 9,
            b'{"action":-1}': 2**32 - 1,
            b"{}": 0,
            b"[]": 0,
            b'[1,{"action":1}]': 0,
            b"5": 0,
            b'"text"': 0,
        }
        for body, action in cases.items():
            self.assertEqual(only(decodeDialog(body)), DialogNoop(action), body)

    def test_unknownKeysReported(self) -> None:
        """Unknown keys are reported (5.6.3 logs them) and the rest is read."""
        decoded = decodeDialog(b'{"action":3,"h_entry":1,"h_id":2,"xtra":1,"other":"y","xtra":2}')
        self.assertEqual(only(decoded), DialogRemove(1, 2))
        self.assertEqual(decoded.unknownKeys, ("xtra", "other"))
        self.assertEqual(set(DIALOG_KEYS) & {"xtra", "other"}, set())

    def test_numbersAsCReadsThem(self) -> None:
        """Fractions are truncated, true is 1, strings and null are 0."""
        update = only(
            decodeDialog(b'{"action":1.9,"h_entry":12.7,"h_id":true,"init_ts":"5","lifetime":null}')
        )
        self.assertEqual((update.hEntry, update.hId, update.initTs, update.lifetime), (12, 1, 0, 0))

    def test_strings(self) -> None:
        """
        Strings keep unicode escapes, raw UTF-8 and raw non-UTF-8 bytes
        (given back byte for byte); \\u0000 is dropped as srjson drops it.
        """
        update = only(
            decodeDialog(
                b'{"action":1,"callid":"\\u00e9\xe2\x82\xac\xff\xfe\\u0000x","tag1":"a\\"b"}'
            )
        )
        self.assertEqual(update.callid, "é€\udcff\udcfex")
        self.assertEqual(valueBytes(update.callid), b"\xc3\xa9\xe2\x82\xac\xff\xfex")
        self.assertEqual(update.tag1, 'a"b')

    def test_loneSurrogateEscape(self) -> None:
        """A lone \\uD800 escape decodes to a string that still has a byte form."""
        update = only(decodeDialog(b'{"action":1,"callid":"a\\ud800b"}'))
        self.assertEqual(valueBytes(update.callid), b"a\xed\xa0\x80b")

    def test_profilesLenient(self) -> None:
        """
        Profiles that are not JSON, lack the array or a name give no entries
        (5.6.3 logs and skips them); the raw string is kept.
        """
        self.assertEqual(decodeProfiles("not json"), ())
        self.assertEqual(decodeProfiles('{"other":[]}'), ())
        self.assertEqual(decodeProfiles('{"profiles":5}'), ())
        self.assertEqual(
            decodeProfiles('{"profiles":[1,{"value":"v"},{"name":7},{"name":"ok","value":3}]}'),
            (DialogProfile("ok"),),
        )
        update = only(decodeDialog(b'{"action":1,"profiles":"{broken"}'))
        self.assertEqual((update.profiles, update.profilesJSON), ((), "{broken"))

    def test_hostileBodies(self) -> None:
        """
        A string key holding a number, null or an object, and UPDATE
        variables that are not strings, would crash 5.6.3: they are a 400,
        marked hostile. Variables are only read by an UPDATE.
        """
        for body in (
            b'{"action":3,"callid":5}',
            b'{"action":0,"profiles":{"profiles":[]}}',
            b'{"tag1":null}',
            b'{"action":1,"vars":{"a":1}}',
            b'{"action":1,"vars":["a"]}',
        ):
            decoded = decodeDialog(body)
            self.assertEqual((decoded.items, decoded.hostile), ((), True), body)
            self.assertIsNotNone(decoded.badRequest)
        self.assertEqual(only(decodeDialog(b'{"action":2,"vars":{"a":1}}')), DialogState())
        self.assertEqual(only(decodeDialog(b'{"action":1,"vars":[]}')).vars, ())
        self.assertEqual(only(decodeDialog(b'{"action":1,"vars":3}')).vars, ())


class DialogAnswerTests(SynchronousTestCase):
    """What the dialog observer answers, case by case, as 5.6.3 would."""

    def test_answers(self) -> None:
        """
        200 for every action 5.6.3 handles; 400 for no body, bad JSON and
        crashing bodies; 500 for an UPDATE or STATE to a state 5.6.3 does
        not handle (3, above 5, negative; 1 for a STATE).
        """
        peer = DialogObserver(Clock())
        cases = {
            DIALOG_EARLY_UPDATE: 200,
            DIALOG_CONFIRMED_UPDATE: 200,
            DIALOG_STATE_CONFIRMED: 200,
            DIALOG_STATE_DELETED: 200,
            DIALOG_RM: 200,
            DIALOG_SYNC: 200,
            b"{}": 200,
            b"[1,2]": 200,
            b'{"action":7}': 200,
            b'{"action":1}': 200,
            b'{"action":1,"state":0}': 200,
            b'{"action":1,"state":3}': 500,
            b'{"action":1,"state":6}': 500,
            b'{"action":1,"state":-1}': 500,
            b'{"action":2,"state":0}': 200,
            b'{"action":2,"state":1}': 500,
            b'{"action":2,"state":2}': 200,
            b'{"action":2,"state":3}': 500,
            b'{"action":2}': 500,
            b'{"action":3,"state":9}': 200,
            b"": 400,
            b"   ": 400,
            b"{": 400,
            b"\x00{}": 400,
            b'{"action":NaN}': 400,
            b'{"action":1,"callid":1}': 400,
        }
        for body, code in cases.items():
            response = answer(peer, body)
            self.assertEqual(response.code, code, body[:60])
            self.assertEqual((response.body, response.contentType), (b"", None))
        self.assertEqual(peer.counters["dialog.in.refused"], 6)
        self.assertEqual(peer.counters["dialog.in.bad_request"], 6)
        self.assertEqual(peer.counters["dialog.in.hostile"], 1)

    def test_reasons(self) -> None:
        """The reason phrases are Kamailio's: OK, Bad Request, Server Internal Error."""
        peer = DialogObserver(Clock())
        self.assertEqual(answer(peer, DIALOG_SYNC).reason, "OK")
        self.assertEqual(answer(peer, b"").reason, "Bad Request")
        self.assertEqual(answer(peer, b'{"action":2,"state":3}').reason, "Server Internal Error")

    def test_syncAnsweredNothingSent(self) -> None:
        """
        A dialog sync request is observed and answered 200, and nothing is
        sent (the observer holds no dialogs); joining a bus asks for nothing.
        """
        peer = DialogObserverFactory().makePeer(stubBus(), "")
        assert isinstance(peer, DialogObserver)
        peer.busJoined()
        self.assertEqual(answer(peer, DIALOG_SYNC).code, 200)
        self.assertEqual(peer.counts(), {"sync": 1})

    def test_unknownAndDuplicateKeysCounted(self) -> None:
        """Messages with unknown or duplicated keys are answered 200 and counted."""
        peer = DialogObserver(Clock())
        self.assertEqual(answer(peer, b'{"action":3,"new_key":1}').code, 200)
        self.assertEqual(answer(peer, DIALOG_EARLY_UPDATE).code, 200)
        self.assertEqual(peer.counters["dialog.in.unknown_keys"], 1)
        self.assertEqual(peer.counters["dialog.in.duplicate_keys"], 1)


# -- usrloc -----------------------------------------------------------------


class UsrlocDecodingTests(SynchronousTestCase):
    """Usrloc bodies captured from Kamailio 5.6.3, and what dmq_usrloc reads."""

    def test_update(self) -> None:
        """A captured contact UPDATE decodes to every field, q -1 included."""
        decoded = decodeUsrloc(USRLOC_ALICE)
        self.assertEqual(only(decoded), ALICE)
        self.assertEqual((decoded.unknownKeys, decoded.batched), ((), False))

    def test_remove(self) -> None:
        """A captured RM decodes to a ContactRemove with the same fields (not a Contact)."""
        removed = only(decodeUsrloc(USRLOC_RM))
        self.assertIsInstance(removed, ContactRemove)
        self.assertNotIsInstance(removed, Contact)
        self.assertEqual(itemDict(removed) | {"kind": "update"}, itemDict(ALICE))

    def test_batch(self) -> None:
        """A captured {"multi":...} sync answer decodes to its two contacts, in order."""
        decoded = decodeUsrloc(USRLOC_MULTI)
        self.assertTrue(decoded.batched)
        self.assertEqual(aors(decoded.items), ["alice@example.test", "bob@example.test"])
        self.assertEqual(decoded.items[0], ALICE)

    def test_batchShapes(self) -> None:
        """
        As in 5.6.3: duplicate batch indexes are all applied, an array of
        contacts works too, a member that is not an object is a no-op, and a
        C{multi} that is neither gives no items; C{multi} counts only first.
        """
        decoded = decodeUsrloc(b'{"multi":{"1":{"action":1,"aor":"a"},"1":{"action":2,"aor":"b"}}}')
        self.assertEqual(decoded.items, (Contact(aor="a"), ContactRemove(aor="b")))
        self.assertEqual(decoded.duplicateKeys, ("1",))
        decoded = decodeUsrloc(b'{"multi":[{"action":3},5,[1]]}')
        self.assertEqual(decoded.items, (UsrlocSync(), UsrlocNoop(), UsrlocNoop()))
        self.assertEqual(decodeUsrloc(b'{"multi":7}'), Decoded(batched=True))
        decoded = decodeUsrloc(b'{"action":1,"multi":{}}')
        self.assertEqual((only(decoded), decoded.unknownKeys), (Contact(), ("multi",)))

    def test_syncAndNone(self) -> None:
        """Action 3 is a sync request, action 0 (or none) a no-op."""
        self.assertEqual(only(decodeUsrloc(USRLOC_SYNC)), UsrlocSync())
        self.assertEqual(only(decodeUsrloc(b'{"action":0}')), UsrlocNoop())
        self.assertEqual(only(decodeUsrloc(b'{"aor":"x"}')), UsrlocNoop())

    def test_lenientFields(self) -> None:
        """
        Unknown keys are reported; C{sock} that is not a string is ignored
        (5.6.3's default replicate_socket_info=0 does not read it); raw
        non-UTF-8 bytes are kept.
        """
        decoded = decodeUsrloc(b'{"action":1,"aor":"\xff\xfeu","sock":5,"zz":1,"ruid":"r"}')
        self.assertEqual(only(decoded), Contact(aor="\udcff\udcfeu", ruid="r"))
        self.assertEqual(decoded.unknownKeys, ("zz",))
        self.assertEqual(
            only(decodeUsrloc(b'{"action":1,"sock":"udp:10.0.0.1:5060"}')).sock,
            "udp:10.0.0.1:5060",
        )
        self.assertIn("sock", USRLOC_KEYS)

    def test_badRequests(self) -> None:
        """
        No first member, an array, a string key holding a non-string (all
        crash 5.6.3: hostile) and an action other than 0-3 (5.6.3's 400)
        are bad requests.
        """
        cases = {
            b"{}": True,
            b"[]": True,
            b'[{"action":1}]': True,
            b"5": True,
            b'"multi"': True,
            b'{"action":1,"aor":5}': True,
            b'{"action":1,"c":null}': True,
            b'{"action":4}': False,
            b'{"action":-1}': False,
            b"{": False,
            b"": False,
        }
        for body, hostile in cases.items():
            decoded = decodeUsrloc(body)
            self.assertIsNotNone(decoded.badRequest, body)
            self.assertEqual((decoded.items, decoded.hostile), ((), hostile), body)

    def test_badItemInBatch(self) -> None:
        """
        A batch stops at its first bad item with a 400; the items before it
        are kept, as 5.6.3 applied them.
        """
        decoded = decodeUsrloc(b'{"multi":{"1":{"action":1,"aor":"a"},"2":{"action":9},"3":{}}}')
        self.assertEqual(decoded.items, (Contact(aor="a"),))
        self.assertEqual((decoded.hostile, decoded.batched), (False, True))
        self.assertIn("9", decoded.badRequest or "")

    def test_batchLimit(self) -> None:
        """Past maxBatchItems the rest of a batch is not decoded, only counted."""
        members = ",".join(f'"{i}":{{"action":1,"aor":"u{i}"}}' for i in range(5))
        decoded = decodeUsrloc(b'{"multi":{' + members.encode() + b"}}", 3)
        self.assertEqual(aors(decoded.items), ["u0", "u1", "u2"])
        self.assertEqual(decoded.truncated, 2)


class UsrlocAnswerTests(SynchronousTestCase):
    """What the usrloc observer answers and records."""

    def test_answers(self) -> None:
        """
        Captured updates, removals, batches and sync requests are answered
        200; bad bodies 400; usrloc never answers 500.
        """
        peer = UsrlocObserver(Clock())
        for body in (USRLOC_ALICE, USRLOC_RM, USRLOC_MULTI, USRLOC_SYNC, b'{"action":0}'):
            self.assertEqual(answer(peer, body).code, 200, body[:40])
        for body in (b"", b"{}", b"[1]", b'{"action":4}', b"{x", b'{"action":1,"aor":[]}'):
            self.assertEqual(answer(peer, body).code, 400, body[:40])
        self.assertEqual(peer.counts(), {"update": 3, "remove": 1, "sync": 1, "none": 1})
        self.assertEqual(peer.counters["usrloc.in.messages"], 11)
        self.assertEqual(peer.counters["usrloc.in.batches"], 1)
        self.assertEqual(peer.counters["usrloc.in.bad_request"], 6)
        self.assertEqual(peer.counters["usrloc.in.hostile"], 3)
        self.assertEqual(peer.summary()["answers"], {"200": 5, "400": 6})

    def test_batchObservedItemByItem(self) -> None:
        """
        Each contact of a batch reaches the observers on its own, marked
        batched, with the sender node and the clock time.
        """
        clock = Clock()
        clock.advance(1000)
        peer = UsrlocObserver(clock)
        seen: list[Observation] = []
        peer.addObserver(seen.append)
        answer(peer, USRLOC_MULTI)
        self.assertEqual(
            [(o.channel, aor, o.batched, o.sender, o.at) for o, aor in zip(seen, aors(seen))],
            [
                ("usrloc", "alice@example.test", True, "sip:127.0.0.1:5070", 1000.0),
                ("usrloc", "bob@example.test", True, "sip:127.0.0.1:5070", 1000.0),
            ],
        )

    def test_unknownSenderNamedByAddress(self) -> None:
        """A message from a node not in the list is recorded with the address it came from."""
        peer = UsrlocObserver(Clock())
        peer.messageReceived(message(USRLOC_SYNC, sender=None))
        self.assertEqual(peer.recent()[0].sender, "udp:127.0.0.1:5070")

    def test_partialBatchObserved(self) -> None:
        """A batch with a bad item is answered 400 after its good items are observed."""
        peer = UsrlocObserver(Clock())
        response = answer(peer, b'{"multi":{"1":{"action":1,"aor":"a"},"2":{"action":1,"aor":1}}}')
        self.assertEqual(response.code, 400)
        self.assertEqual([o.item for o in peer.recent()], [Contact(aor="a")])
        self.assertEqual(peer.counters["usrloc.in.hostile"], 1)

    def test_batchLimitEdge(self) -> None:
        """
        At maxBatchItems every item is observed; one more is left out,
        counted and logged, and the message is still answered 200.
        """
        peer = UsrlocObserver(Clock(), ObserverLimits(maxBatchItems=2))
        self.assertEqual(answer(peer, b'{"multi":[{"action":1},{"action":1}]}').code, 200)
        self.assertEqual(peer.counters["usrloc.in.batch_truncated"], 0)
        self.assertEqual(
            answer(peer, b'{"multi":[{"action":1},{"action":1},{"action":2}]}').code, 200
        )
        self.assertEqual(peer.counts(), {"update": 4})
        self.assertEqual(peer.counters["usrloc.in.batch_truncated"], 1)

    def test_syncAnsweredNothingSent(self) -> None:
        """A usrloc sync request is answered 200 and nothing is sent (we hold no contacts)."""
        peer = UsrlocObserverFactory().makePeer(stubBus(), "")
        assert isinstance(peer, UsrlocObserver)
        self.assertEqual(answer(peer, USRLOC_SYNC).code, 200)


# -- presence ---------------------------------------------------------------


class PresenceTests(SynchronousTestCase):
    """Presence bodies as 5.6.3's presence module writes them, and its strict reading."""

    def test_update(self) -> None:
        """An UPDATE_PRESENTITY decodes to the presentity and every top-level field."""
        self.assertEqual(
            only(decodePresence(PRESENCE_UPDATE)),
            PresentityUpdate(
                presentity=Presentity(
                    domain="example.com",
                    user="alice",
                    etag="a.1700000000.1.2.0",
                    expires=3600,
                    recv=1700000000,
                    sender="sip:192.0.2.1:5060",
                    event="presence",
                ),
                tNew=1,
                curEtag="a.1700000000.1.1.0",
                sphere="work",
                ruid="pres-5d1c-1",
                body='<?xml version="1.0"?><presence entity="sip:alice@example.com"/>',
            ),
        )

    def test_syncAndNone(self) -> None:
        """Action 2 is a sync (ignored by 5.6.3), 0, none or unknown a no-op."""
        self.assertEqual(only(decodePresence(PRESENCE_SYNC)), PresenceSync())
        self.assertEqual(only(decodePresence(b"{}")), PresenceNoop())
        self.assertEqual(only(decodePresence(b"[]")), PresenceNoop())
        self.assertEqual(only(decodePresence(b'{"action":5}')), PresenceNoop(5))

    def test_lenientCorners(self) -> None:
        """
        A sphere that is not a string and an empty body read as absent;
        duplicate keys are reported (the last wins); the key sets are 5.6.3's.
        """
        decoded = decodePresence(
            b'{"action":1,"sphere":3,"body":"","t_new":0,"t_new":1,"presentity":{"event":"dialog"}}'
        )
        update = only(decoded)
        self.assertEqual((update.sphere, update.body, update.tNew), (None, None, 1))
        self.assertEqual(update.presentity, Presentity(event="dialog"))
        self.assertEqual(decoded.duplicateKeys, ("t_new",))
        self.assertIn("presentity", PRESENCE_KEYS)
        self.assertIn("event", PRESENTITY_KEYS)

    def test_answers(self) -> None:
        """
        200 for updates, syncs and no-ops; 400 for unknown keys (top level or
        presentity), a presentity without event, bad JSON and crashing
        bodies; 500 for an UPDATE without presentity.
        """
        peer = PresenceObserver(Clock())
        cases: dict[bytes, tuple[int, bool]] = {
            PRESENCE_UPDATE: (200, False),
            PRESENCE_SYNC: (200, False),
            b"{}": (200, False),
            b'{"action":2,"presentity":{"event":"presence"}}': (200, False),
            b'{"action":1}': (500, False),
            b'{"action":1,"extra":1}': (400, False),
            b'{"action":1,"presentity":{"event":"presence","x":1}}': (400, False),
            b'{"action":1,"presentity":{"user":"u"}}': (400, False),
            b'{"action":1,"presentity":{"event":""}}': (400, False),
            b'{"action":2,"presentity":"p"}': (400, False),
            b'{"action":2,"presentity":[]}': (400, False),
            b"": (400, False),
            b'{"action":1,"presentity":[1]}': (400, True),
            b'{"action":1,"presentity":{"event":"presence","domain":1}}': (400, True),
            b'{"action":1,"ruid":null}': (400, True),
            b"[1]": (400, True),
        }
        hostile = 0
        for body, (code, isHostile) in cases.items():
            self.assertEqual(answer(peer, body).code, code, body[:60])
            hostile += isHostile
            self.assertEqual(peer.counters["presence.in.hostile"], hostile, body[:60])
        self.assertEqual(peer.counters["presence.in.refused"], 1)

    def test_syncAnsweredNothingSent(self) -> None:
        """A presence sync request is answered 200 and nothing is sent."""
        peer = PresenceObserverFactory().makePeer(stubBus(), "")
        assert isinstance(peer, PresenceObserver)
        self.assertEqual(answer(peer, PRESENCE_SYNC).code, 200)


# -- any channel ------------------------------------------------------------

DECODERS = (decodeDialog, decodeUsrloc, decodePresence)


class HostileInputTests(SynchronousTestCase):
    """No body, however hostile, makes a decoder raise or an observer fail."""

    @given(st.binary(max_size=300))
    def test_anyBytes(self, body: bytes) -> None:
        """Any bytes at all decode without raising and are answered 200, 400 or 500."""
        for decode in DECODERS:
            decode(body)
        for peer in (DialogObserver(Clock()), UsrlocObserver(Clock()), PresenceObserver(Clock())):
            self.assertIn(answer(peer, body).code, (200, 400, 500))
            self.assertEqual(peer.counters[peer.channel + ".in.errors"], 0)

    @given(hostileJSON(sorted(DIALOG_KEYS | USRLOC_KEYS | PRESENCE_KEYS | PRESENTITY_KEYS)))
    def test_anyJSON(self, value: object) -> None:
        """Any JSON value with the channels' keys in any shape is answered 200, 400 or 500."""
        body = json.dumps(value).encode()
        for peer in (DialogObserver(Clock()), UsrlocObserver(Clock()), PresenceObserver(Clock())):
            self.assertIn(answer(peer, body).code, (200, 400, 500))
            self.assertEqual(peer.counters[peer.channel + ".in.errors"], 0)
            json.dumps(peer.summary())

    def test_deepNesting(self) -> None:
        """JSON nested 100,000 deep is a 400 on every channel, not a crash."""
        body = b"[" * 100_000 + b"]" * 100_000
        obj = b'{"multi":' * 50_000 + b"1" + b"}" * 50_000
        for decode in DECODERS:
            self.assertIsNotNone(decode(body).badRequest)
            self.assertIsNotNone(decode(obj).badRequest)

    def test_cString(self) -> None:
        """
        As 5.6.3 reads a body (a C string): up to its first NUL byte, after
        leading white space and control bytes, ignoring what follows the value.
        """
        self.assertEqual(only(decodeUsrloc(b'\r\n\t {"action":3} trailing')), UsrlocSync())
        self.assertEqual(only(decodeUsrloc(b'{"action":3}\x00garbage')), UsrlocSync())
        self.assertIsNotNone(decodeUsrloc(b'{"action":3\x00}').badRequest)

    def test_hugeNumbers(self) -> None:
        """Numbers beyond any C type, and 1e999, are read without raising."""
        update = only(decodeDialog(b'{"action":1,"h_entry":1e999,"h_id":-1e400,"state":1e30}'))
        self.assertEqual((update.hEntry, update.hId), (0, 0))
        self.assertEqual(only(decodeUsrloc(b'{"action":4294967297}')), Contact())

    def test_peerBugIs500(self) -> None:
        """A decoder that raises (a bug of ours) gives 500, counted and logged; the peer lives on."""

        def broken(body: bytes, limit: int) -> Decoded:
            raise RuntimeError("bug")

        peer = ChannelObserver(Clock(), ChannelCodec("usrloc", "broken", broken, lambda i: None))
        self.assertEqual(answer(peer, USRLOC_SYNC).code, 500)
        self.assertEqual(peer.counters["usrloc.in.errors"], 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class RecordTests(SynchronousTestCase):
    """The bounded record, the subscribers and the summary."""

    def test_boundedRecord(self) -> None:
        """
        With recent=3, five updates leave the last three in the record,
        oldest first, while the counts go on.
        """
        peer = UsrlocObserver(Clock(), ObserverLimits(recent=3))
        for i in range(5):
            answer(peer, b'{"action":1,"aor":"u%d"}' % i)
        self.assertEqual(aors(peer.recent()), ["u2", "u3", "u4"])
        self.assertEqual(peer.counts(), {"update": 5})
        self.assertEqual(peer.summary()["limit"], 3)

    def test_defaultLimits(self) -> None:
        """The record keeps the last 100 items by default; the limits refuse 0."""
        peer = DialogObserver(Clock())
        for _ in range(101):
            answer(peer, DIALOG_SYNC)
        self.assertEqual(len(peer.recent()), 100)
        self.assertEqual(ObserverLimits(), ObserverLimits(100, 10_000, 256))
        for field in ("recent", "maxBatchItems", "summaryChars"):
            self.assertRaises(ValueError, ObserverLimits, **{field: 0})

    def test_observers(self) -> None:
        """
        Observers are called with every item in order; the function
        returned by addObserver removes one (twice is harmless); a failing
        observer is logged and counted and the others still run.
        """
        peer = PresenceObserver(Clock())
        first: list[Observation] = []
        second: list[Observation] = []

        def failing(observation: Observation) -> None:
            raise ValueError("observer bug")

        removeFirst = peer.addObserver(first.append)
        peer.addObserver(failing)
        peer.addObserver(second.append)
        self.assertEqual(answer(peer, PRESENCE_UPDATE).code, 200)
        self.assertEqual(answer(peer, PRESENCE_SYNC).code, 200)
        removeFirst()
        removeFirst()
        answer(peer, b"{}")
        self.assertEqual([o.item.kind for o in first], ["update", "sync"])
        self.assertEqual([o.item.kind for o in second], ["update", "sync", "none"])
        self.assertEqual(peer.counters["presence.observer_errors"], 3)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 3)

    def test_badBodiesNotObserved(self) -> None:
        """A 400 or a crashing body reaches no observer and leaves the record as it was."""
        peer = DialogObserver(Clock())
        seen: list[Observation] = []
        peer.addObserver(seen.append)
        answer(peer, b"{nope")
        answer(peer, b'{"action":1,"callid":{}}')
        self.assertEqual((seen, peer.recent(), peer.counts()), ([], [], {}))

    def test_refusedItemsObserved(self) -> None:
        """An item answered 500 (as 5.6.3 would) is still observed: it was sent."""
        peer = DialogObserver(Clock())
        answer(peer, b'{"action":2,"h_entry":1,"h_id":1,"state":3}')
        self.assertEqual(peer.counts(), {"state": 1})

    def test_summary(self) -> None:
        """
        The summary holds the channel, message count, counts per kind,
        answers per code, the limit and the last items as dicts, with long
        strings cut at summaryChars; it is ASCII JSON even with raw bytes.
        """
        clock = Clock()
        peer = DialogObserver(clock, ObserverLimits(summaryChars=5))
        answer(peer, b'{"action":1,"callid":"0123456789\xff","vars":{"k":"abcdefgh"}}')
        answer(peer, b"")
        summary = peer.summary()
        self.assertEqual(
            {k: v for k, v in summary.items() if k != "recent"},
            {
                "channel": "dialog",
                "messages": 2,
                "counts": {"update": 1},
                "answers": {"200": 1, "400": 1},
                "limit": 100,
            },
        )
        [recent] = summary["recent"]
        self.assertEqual(
            (recent["at"], recent["sender"], recent["batched"]), (0.0, "sip:127.0.0.1:5070", False)
        )
        self.assertEqual(recent["item"]["kind"], "update")
        self.assertEqual(recent["item"]["callid"], "01234…")
        self.assertEqual(recent["item"]["vars"], {"k": "abcde…"})
        json.dumps(summary).encode("ascii")
        item = peer.recent()[0].item
        assert isinstance(item, DialogUpdate)
        self.assertEqual(item.callid, "0123456789\udcff")

    def test_itemDicts(self) -> None:
        """Every kind of item renders as a dict with its kind first."""
        items = [
            *decodeDialog(DIALOG_EARLY_UPDATE).items,
            *decodeUsrloc(USRLOC_MULTI).items,
            *decodePresence(PRESENCE_UPDATE).items,
            DialogNoop(),
            PresenceSync(),
        ]
        for item in items:
            rendered = itemDict(item)
            self.assertEqual(next(iter(rendered)), "kind")
            json.dumps(rendered)
        presence = itemDict(decodePresence(PRESENCE_UPDATE).items[0])
        self.assertEqual(presence["presentity"]["user"], "alice")
        self.assertEqual(
            itemDict(decodeDialog(DIALOG_EARLY_UPDATE).items[0])["profiles"][1]["flags"], 2
        )


class InterfaceTests(SynchronousTestCase):
    """The peers and factories provide their interfaces, and the options parse."""

    def test_peersProvide(self) -> None:
        """Every observer provides IDMQPeer and IObservedChannel, on its Kamailio channel."""
        for peer, channel in (
            (DialogObserver(Clock()), "dialog"),
            (UsrlocObserver(Clock()), "usrloc"),
            (PresenceObserver(Clock()), "presence"),
        ):
            self.assertTrue(verifyObject(IDMQPeer, peer))
            self.assertTrue(verifyObject(IObservedChannel, peer))
            self.assertEqual(peer.channel, channel)
            self.assertIn("read-only", peer.description)

    def test_factories(self) -> None:
        """
        The plugins are named dialog, usrloc and presence, provide
        IDMQPeerFactory and IPlugin, and make the matching observer with the
        options given.
        """
        for factory, cls in (
            (DialogObserverFactory(), DialogObserver),
            (UsrlocObserverFactory(), UsrlocObserver),
            (PresenceObserverFactory(), PresenceObserver),
        ):
            self.assertTrue(verifyObject(IDMQPeerFactory, factory))
            self.assertTrue(verifyObject(IPlugin, factory))
            self.assertEqual(factory.name, cls(Clock()).channel)
            self.assertIn(factory.name, factory.description)
            peer = factory.makePeer(stubBus(), "recent=7; maxBatchItems=9")
            assert isinstance(peer, cls)
            self.assertEqual(peer.limits, ObserverLimits(recent=7, maxBatchItems=9))

    def test_options(self) -> None:
        """Options are recent, maxBatchItems and summaryChars, positive integers; others are refused."""
        self.assertEqual(parseObserverOptions(""), ObserverLimits())
        self.assertEqual(parseObserverOptions("summaryChars=10;"), ObserverLimits(summaryChars=10))
        for bad in ("recent", "recent=0", "recent=-1", "recent=x", "size=3", "recent=1.5"):
            self.assertRaises(ValueError, parseObserverOptions, bad)
