"""
Read-only observers of Kamailio's C{dialog}, C{usrloc} and C{presence} DMQ
channels: a dmq-bus node that joins a Kamailio bus sees every dialog,
registration and presentity change its Kamailio nodes replicate, decoded
into typed values, and answers each message as a Kamailio 5.6.3 node would.
The observers hold no dialogs, contacts or presentities and never send.

Three parts, each usable on its own:

  - the decoders (L{decodeDialog}, L{decodeUsrloc}, L{decodePresence}):
    bodies in, frozen values out (L{DialogUpdate}, L{Contact},
    L{PresentityUpdate}, ...), read the way the 5.6.3 modules read them
    (C{dlg_dmq.c}, C{usrloc_sync.c}, C{presence_dmq.c}; spec §6.2-§6.4):
    duplicate keys accepted (the last wins, as 5.6.3's dialog module sends
    C{tag1}/C{cseq1}/C{route_set1}/C{contact1} twice), raw non-UTF-8 bytes
    kept in strings (C{surrogateescape}), the body read up to its first NUL
    byte (a C string), bytes after the JSON value ignored, numbers read as
    C reads them (fractions truncated, C{true} = 1, anything else that is
    not a number = 0), absent fields at the module's default;
  - the answers (L{Decoded.badRequest}, L{refusal}): what 5.6.3 answers;
  - the peers (L{ChannelObserver} and its three named forms): a bounded
    record (counts per action, the last L{ObserverLimits.recent} items) and
    subscribers (L{IObservedChannel.addObserver}).

Answers, per channel (all without body; the 5.6.3 senders ignore every
answer on these channels, spec §1.4, so they only feed counters):

  - every channel, C{400 Bad Request}: missing or empty body (no or zero
    Content-Length), or unparsable JSON (our parser is a little stricter
    than 5.6.3's srjson: a number with leading zeros such as C{01}, or an
    unknown escape such as C{\\q}, gets 400 where srjson reads a value).
  - every channel, C{400 Bad Request} also where 5.6.3 would crash
    (SIGSEGV, the whole Kamailio instance stops; spec §7 bug 2): a field
    read as a string holding a number, C{null}, an object or an array
    (5.6.3 calls C{strlen(NULL)}), and the shapes listed per channel. We
    never crash; these are counted apart (C{CHANNEL.in.hostile}).
  - C{dialog}: anything else that parses is 200, including C{{}}, arrays
    and unknown keys (logged and counted, as 5.6.3 logs them), except
    C{500 Server Internal Error} for an UPDATE (action 1) carrying state 3
    or above 5, and a STATE (action 2) carrying state 1, 3 or above 5
    (5.6.3: "unhandled state update"). 5.6.3 also answers 500 to a STATE
    or RM for a dialog it does not hold, and to an UPDATE whose C{h_entry}
    does not match its own hash of the Call-ID (different C{hash_size}):
    an observer holds no dialogs and knows no hash size, so it answers as
    a node that holds the dialog in an earlier state (STATE, RM) or not
    yet (UPDATE), and those answer 200. Hostile: C{vars} in an UPDATE
    holding a non-string value, or an array with members.
  - C{usrloc}: 400 also for an action other than 0-3 (5.6.3's "invalid");
    in a C{{"multi":...}} batch the items before such an item are
    observed (5.6.3 applied them) and the answer is still 400. Never 500:
    5.6.3 ignores the result of storing or deleting a contact. Hostile: a
    body without a first member (C{{}}, C{[]}, a bare value) or whose first
    member has no name (an array). Unknown keys are logged and counted.
    C{sock} is read as an optional string (5.6.3's default
    C{replicate_socket_info=0} ignores it).
  - C{presence}: 400 also for an unknown key at the top level or in the
    presentity, and for a presentity without C{event} (or with an empty
    one; 5.6.3 also answers 400 for an event its presence module does not
    know: we accept every event name). 500 for UPDATE_PRESENTITY (action 1)
    without a presentity. Hostile: an array with members, a presentity that
    is an array with members. C{sphere} that is not a string is read as
    absent (5.6.3 does not C{strlen} it); an empty C{body} is absent.

Sync requests (dialog action 4, usrloc action 3, presence action 2) are
observed and answered 200, and nothing is sent: we hold nothing to sync.
The observers never ask for a sync either (L{ChannelObserver.busJoined}
does nothing): a dialog sync request makes every 5.6.3 node broadcast
every dialog it holds to every node.
"""

from __future__ import annotations

import json
import math
from collections import Counter, deque
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from dmq_bus.bus.values import DMQMessage, PeerResponse
from dmq_bus.interfaces import IDMQBus, IDMQPeer, IDMQPeerFactory, IObservedChannel
from dmq_bus.peers.srjson import readJSON

CONTENT_TYPE = "application/json"
"""The content type 5.6.3 sends on these channels (never checked on receipt)."""

DIALOG = "dialog"
USRLOC = "usrloc"
PRESENCE = "presence"

# dialog actions (dlg_dmq.h)
DLG_NONE, DLG_UPDATE, DLG_STATE, DLG_RM, DLG_SYNC = range(5)
# dialog states (dlg_hash.h)
DLG_STATE_UNCONFIRMED = 1
DLG_STATE_EARLY = 2
DLG_STATE_CONFIRMED_NA = 3
DLG_STATE_CONFIRMED = 4
DLG_STATE_DELETED = 5
# usrloc actions (usrloc_sync.h)
UL_NONE, UL_UPDATE, UL_RM, UL_SYNC = range(4)
# presence actions (presence_dmq.h)
PRES_NONE, PRES_UPDATE_PRESENTITY, PRES_SYNC = range(3)

_REPLICATED_DIALOG_STATES = frozenset({DLG_STATE_EARLY, DLG_STATE_CONFIRMED, DLG_STATE_DELETED})


# ---------------------------------------------------------------------------
# Decoded values


@attrs.frozen
class DialogProfile:
    """
    One entry of a dialog's C{profiles} (a string holding JSON
    C{{"profiles":[{"name","value"?,"puid"?,"expires"?,"flags"?}]}}).
    """

    name: str
    value: str | None = None
    puid: str | None = None
    expires: int = 0
    flags: int = 0


@attrs.frozen
class DialogUpdate:
    """
    Dialog action 1 (UPDATE): a dialog was created or changed, or is sent
    whole in answer to a sync. C{hEntry}/C{hId} identify it on every node.
    C{state} is 1 (unconfirmed) when absent, as 5.6.3 reads it. C{profiles}
    holds the entries of C{profilesJSON} that have a name (an unparsable
    C{profilesJSON} gives none, as 5.6.3 logs and skips it); C{vars} are
    the dialog variables in message order.
    """

    kind: ClassVar[str] = "update"

    hEntry: int = 0
    hId: int = 0
    state: int = DLG_STATE_UNCONFIRMED
    initTs: int = 0
    startTs: int = 0
    lifetime: int = 0
    callid: str | None = None
    fromURI: str | None = None
    toURI: str | None = None
    reqURI: str | None = None
    tag1: str | None = None
    tag2: str | None = None
    cseq1: str | None = None
    cseq2: str | None = None
    routeSet1: str | None = None
    routeSet2: str | None = None
    contact1: str | None = None
    contact2: str | None = None
    profiles: tuple[DialogProfile, ...] = ()
    profilesJSON: str | None = None
    vars: tuple[tuple[str, str], ...] = ()


@attrs.frozen
class DialogState:
    """
    Dialog action 2 (STATE): a dialog moved to C{state} (2 early,
    4 confirmed, 5 deleted are the ones 5.6.3 replicates), with the leg
    fields of the new state.
    """

    kind: ClassVar[str] = "state"

    hEntry: int = 0
    hId: int = 0
    state: int = DLG_STATE_UNCONFIRMED
    startTs: int = 0
    lifetime: int = 0
    tag1: str | None = None
    tag2: str | None = None
    cseq1: str | None = None
    cseq2: str | None = None
    routeSet1: str | None = None
    routeSet2: str | None = None
    contact1: str | None = None
    contact2: str | None = None


@attrs.frozen
class DialogRemove:
    """Dialog action 3 (RM): the dialog is gone; C{state} is its last state."""

    kind: ClassVar[str] = "remove"

    hEntry: int = 0
    hId: int = 0
    state: int = DLG_STATE_UNCONFIRMED


@attrs.frozen
class DialogSync:
    """Dialog action 4 (SYNC): a node asks for every dialog (we hold none)."""

    kind: ClassVar[str] = "sync"


@attrs.frozen
class DialogNoop:
    """Dialog action 0 (NONE, also a missing action) or an unknown action: 5.6.3 does nothing."""

    kind: ClassVar[str] = "none"

    action: int = DLG_NONE


@attrs.frozen
class ContactFields:
    """
    The fields of a usrloc contact message, as the wire carries them.
    C{contact} is the wire's C{c}; C{expires} and C{lastModified} are
    absolute Unix times; C{q} is what the wire carries (-1 = unset, as 5.6.3
    sends it). Strings absent from the message are None, numbers 0 (5.6.3's
    defaults).
    """

    aor: str | None = None
    ruid: str | None = None
    contact: str | None = None
    received: str | None = None
    sock: str | None = None
    path: str | None = None
    callid: str | None = None
    userAgent: str | None = None
    instance: str | None = None
    expires: int = 0
    cseq: int = 0
    flags: int = 0
    cflags: int = 0
    q: int = 0
    lastModified: int = 0
    methods: int = 0
    regId: int = 0
    serverId: int = 0


@attrs.frozen
class Contact(ContactFields):
    """
    Usrloc action 1 (UPDATE): a contact was inserted or updated (5.6.3
    replicates both the same way; an expiry is not replicated).
    """

    kind: ClassVar[str] = "update"


@attrs.frozen
class ContactRemove(ContactFields):
    """
    Usrloc action 2 (RM): a contact was deleted (5.6.3 finds it by C{aor}
    and C{ruid}; the other fields are the contact as it was).
    """

    kind: ClassVar[str] = "remove"


@attrs.frozen
class UsrlocSync:
    """Usrloc action 3 (SYNC): a node asks for every contact (we hold none)."""

    kind: ClassVar[str] = "sync"


@attrs.frozen
class UsrlocNoop:
    """Usrloc action 0 (NONE, also a missing action): 5.6.3 does nothing."""

    kind: ClassVar[str] = "none"


@attrs.frozen
class Presentity:
    """
    The C{presentity} of a presence UPDATE: C{expires} in seconds,
    C{recv} the Unix time it was received (0 = unknown).
    """

    domain: str | None = None
    user: str | None = None
    etag: str | None = None
    expires: int = 0
    recv: int = 0
    sender: str | None = None
    event: str = ""


@attrs.frozen
class PresentityUpdate:
    """
    Presence action 1 (UPDATE_PRESENTITY): a PUBLISH was stored on a node.
    C{presentity} is None when the message has none (answered 500).
    C{tNew} is 1 for a new presentity; C{body} is the published document
    (None for none or empty).
    """

    kind: ClassVar[str] = "update"

    presentity: Presentity | None = None
    tNew: int = 0
    curEtag: str | None = None
    sphere: str | None = None
    ruid: str | None = None
    body: str | None = None


@attrs.frozen
class PresenceSync:
    """Presence action 2 (SYNC): accepted and ignored by 5.6.3 (and by us)."""

    kind: ClassVar[str] = "sync"

    presentity: Presentity | None = None


@attrs.frozen
class PresenceNoop:
    """Presence action 0 (NONE, also a missing action) or an unknown action."""

    kind: ClassVar[str] = "none"

    action: int = PRES_NONE
    presentity: Presentity | None = None


DialogItem = DialogUpdate | DialogState | DialogRemove | DialogSync | DialogNoop
UsrlocItem = Contact | ContactRemove | UsrlocSync | UsrlocNoop
PresenceItem = PresentityUpdate | PresenceSync | PresenceNoop
ChannelItem = DialogItem | UsrlocItem | PresenceItem
"""One decoded action of any observed channel."""


@attrs.frozen
class Decoded:
    """
    What one body holds, as a 5.6.3 receiver reads it.

    @ivar items: the actions, in order: one, or those of a usrloc
        C{{"multi":...}} batch (C{batched}); with C{badRequest} set, the
        ones 5.6.3 applied before it stopped (possibly none).
    @ivar badRequest: why 5.6.3 answers C{400 Bad Request} (or would crash:
        C{hostile}), None when it does not.
    @ivar unknownKeys: keys 5.6.3 logs as unrecognized and skips.
    @ivar duplicateKeys: keys given more than once in one object (the last
        value wins).
    @ivar truncated: items of a batch left out past
        L{ObserverLimits.maxBatchItems}.
    """

    items: tuple[ChannelItem, ...] = ()
    badRequest: str | None = None
    hostile: bool = False
    unknownKeys: tuple[str, ...] = ()
    duplicateKeys: tuple[str, ...] = ()
    batched: bool = False
    truncated: int = 0


# ---------------------------------------------------------------------------
# Lenient JSON, read as srjson reads it


class _Object:
    """A JSON object with its members in order, duplicates kept."""

    __slots__ = ("pairs",)

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        self.pairs = pairs

    def get(self, key: str, default: Any = None) -> Any:
        """The last value of C{key} (as 5.6.3's loops keep the last one)."""
        for name, value in reversed(self.pairs):
            if name == key:
                return value
        return default

    def __contains__(self, key: str) -> bool:
        return any(name == key for name, _ in self.pairs)

    def duplicates(self) -> list[str]:
        seen: set[str] = set()
        repeated: list[str] = []
        for name, _ in self.pairs:
            if name in seen and name not in repeated:
                repeated.append(name)
            seen.add(name)
        return repeated


class _BadRequest(Exception):
    """A body 5.6.3 answers 400 (C{hostile}: a body that crashes 5.6.3)."""

    def __init__(self, reason: str, hostile: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.hostile = hostile


def _noConstant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(strict=False, object_pairs_hook=_Object, parse_constant=_noConstant)


def _parse(body: bytes) -> object:
    """
    The JSON value of C{body} read as a C string (up to the first NUL),
    leading bytes ≤ 0x20 skipped and trailing bytes ignored, as srjson does.
    """
    nul = body.find(b"\x00")
    if nul >= 0:
        body = body[:nul]
    try:
        return readJSON(body, _DECODER)
    except ValueError as e:
        raise _BadRequest(str(e)) from None


def _clean(text: str) -> str:
    """
    A decoded string as 5.6.3 keeps it: C{\\u0000} escapes dropped (srjson
    skips them), and lone surrogates from C{\\uD8xx} escapes kept as the
    bytes of their UTF-8-style encoding (C{surrogateescape}) so every
    character has a byte form.
    """
    if "\x00" in text:
        text = text.replace("\x00", "")
    try:
        text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "surrogateescape")
    return text


def _number(value: object) -> int:
    """
    A JSON value as 5.6.3's C{SRJSON_GET_INT/UINT} read it: numbers with
    the fraction truncated, C{true} 1, everything else 0.
    """
    if value is True:
        return 1
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return int(value)
    return 0


def _unsigned(number: int) -> int:
    """
    An int as C{(unsigned int)} of a double reads it on x86-64: modulo
    2**32 within the 64-bit range, 0 beyond it.
    """
    return number % 2**32 if -(2**63) <= number < 2**63 else 0


def _string(obj: _Object, key: str, owner: str) -> str | None:
    """
    A member read with C{strlen(valuestring)}: None when absent.

    @raise _BadRequest: present but not a string (5.6.3 crashes).
    """
    if key not in obj:
        return None
    value = obj.get(key)
    if not isinstance(value, str):
        raise _BadRequest(
            f"{owner} key {key!r} holds {type(value).__name__}, not a string", hostile=True
        )
    return _clean(value)


def _unknown(obj: _Object, known: frozenset[str]) -> list[str]:
    return [name for name, _ in obj.pairs if name not in known]


def _uniq(names: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))


# ---------------------------------------------------------------------------
# dialog


DIALOG_KEYS = frozenset(
    {
        "action",
        "h_entry",
        "h_id",
        "init_ts",
        "start_ts",
        "state",
        "lifetime",
        "callid",
        "from_uri",
        "to_uri",
        "req_uri",
        "tag1",
        "tag2",
        "cseq1",
        "cseq2",
        "route_set1",
        "route_set2",
        "contact1",
        "contact2",
        "profiles",
        "vars",
    }
)
"""The keys a 5.6.3 dialog receiver reads (others are logged and skipped)."""

_DIALOG_STRINGS = (
    ("callid", "callid"),
    ("from_uri", "fromURI"),
    ("to_uri", "toURI"),
    ("req_uri", "reqURI"),
    ("tag1", "tag1"),
    ("tag2", "tag2"),
    ("cseq1", "cseq1"),
    ("cseq2", "cseq2"),
    ("route_set1", "routeSet1"),
    ("route_set2", "routeSet2"),
    ("contact1", "contact1"),
    ("contact2", "contact2"),
    ("profiles", "profilesJSON"),
)


def decodeProfiles(text: str) -> tuple[DialogProfile, ...]:
    """
    The entries of a dialog's C{profiles} string. Like 5.6.3, an
    unparsable string or one without a C{profiles} array gives none, and an
    entry without a string C{name} is skipped (so are entries 5.6.3 would
    crash on: we only read them).
    """
    try:
        root = _parse(valueBytes(text))
    except _BadRequest:
        return ()
    entries = root.get("profiles") if isinstance(root, _Object) else None
    if isinstance(entries, _Object):
        entries = [value for _, value in entries.pairs]
    if not isinstance(entries, list):
        return ()
    profiles = []
    for entry in entries:
        if not isinstance(entry, _Object):
            continue
        name = entry.get("name")
        if not isinstance(name, str):
            continue
        value, puid = entry.get("value"), entry.get("puid")
        profiles.append(
            DialogProfile(
                name=_clean(name),
                value=_clean(value) if isinstance(value, str) else None,
                puid=_clean(puid) if isinstance(puid, str) else None,
                expires=_number(entry.get("expires")),
                flags=_number(entry.get("flags")),
            )
        )
    return tuple(profiles)


def _dialogVars(vars: object) -> tuple[tuple[str, str], ...]:
    """C{vars} as 5.6.3's UPDATE reads them (names and values must be strings)."""
    if isinstance(vars, list):
        if vars:
            raise _BadRequest("dialog 'vars' is an array with members", hostile=True)
        return ()
    if not isinstance(vars, _Object):
        return ()
    pairs = []
    for name, value in vars.pairs:
        if not isinstance(value, str):
            raise _BadRequest(
                f"dialog variable {name!r} holds {type(value).__name__}, not a string",
                hostile=True,
            )
        pairs.append((_clean(name), _clean(value)))
    return tuple(pairs)


def _decodeDialogObject(obj: _Object) -> DialogItem:
    text = {attr: _string(obj, key, "dialog") for key, attr in _DIALOG_STRINGS}
    action = _unsigned(_number(obj.get("action")))
    hEntry, hId = _number(obj.get("h_entry")), _number(obj.get("h_id"))
    state = _number(obj.get("state", DLG_STATE_UNCONFIRMED))
    startTs, lifetime = _number(obj.get("start_ts")), _number(obj.get("lifetime"))
    if action == DLG_UPDATE:
        profilesJSON = text["profilesJSON"]
        return DialogUpdate(
            hEntry=hEntry,
            hId=hId,
            state=state,
            initTs=_number(obj.get("init_ts")),
            startTs=startTs,
            lifetime=lifetime,
            callid=text["callid"],
            fromURI=text["fromURI"],
            toURI=text["toURI"],
            reqURI=text["reqURI"],
            tag1=text["tag1"],
            tag2=text["tag2"],
            cseq1=text["cseq1"],
            cseq2=text["cseq2"],
            routeSet1=text["routeSet1"],
            routeSet2=text["routeSet2"],
            contact1=text["contact1"],
            contact2=text["contact2"],
            profiles=decodeProfiles(profilesJSON) if profilesJSON is not None else (),
            profilesJSON=profilesJSON,
            vars=_dialogVars(obj.get("vars")),
        )
    if action == DLG_STATE:
        return DialogState(
            hEntry=hEntry,
            hId=hId,
            state=state,
            startTs=startTs,
            lifetime=lifetime,
            tag1=text["tag1"],
            tag2=text["tag2"],
            cseq1=text["cseq1"],
            cseq2=text["cseq2"],
            routeSet1=text["routeSet1"],
            routeSet2=text["routeSet2"],
            contact1=text["contact1"],
            contact2=text["contact2"],
        )
    if action == DLG_RM:
        return DialogRemove(hEntry=hEntry, hId=hId, state=state)
    if action == DLG_SYNC:
        return DialogSync()
    return DialogNoop(action)


def decodeDialog(body: bytes) -> Decoded:
    """
    Decode a C{dialog} body (spec §6.2) as 5.6.3's C{dlg_dmq_handle_msg}
    reads it: members without a name (those of an array) are skipped, so
    C{{}}, C{[]} and bare values are a NONE; unknown keys are reported.
    Never raises.
    """
    try:
        root = _parse(body)
        obj = root if isinstance(root, _Object) else _Object([])
        item = _decodeDialogObject(obj)
    except _BadRequest as e:
        return Decoded(badRequest=e.reason, hostile=e.hostile)
    return Decoded(
        items=(item,),
        unknownKeys=_uniq(_unknown(obj, DIALOG_KEYS)),
        duplicateKeys=tuple(obj.duplicates()),
    )


def dialogRefusal(item: ChannelItem) -> str | None:
    """
    Why 5.6.3 answers this dialog action C{500 Server Internal Error}, as a
    node that does not hold the dialog yet (UPDATE) or holds it in an
    earlier state (STATE): a state it does not handle (1 for a STATE, 3,
    above 5, negative). None for 200.
    """
    if not isinstance(item, DialogUpdate | DialogState):
        return None
    state = _unsigned(item.state)  # 5.6.3 reads it unsigned: -1 is 4294967295
    if state in _REPLICATED_DIALOG_STATES or state < DLG_STATE_UNCONFIRMED:
        return None  # handled, or lower than any held state: ignored
    if state == DLG_STATE_UNCONFIRMED and isinstance(item, DialogUpdate):
        return None  # the state a new dialog starts in: nothing to do
    return f"unhandled state update to state {state}"


# ---------------------------------------------------------------------------
# usrloc


USRLOC_KEYS = frozenset(
    {
        "action",
        "aor",
        "ruid",
        "c",
        "received",
        "sock",
        "path",
        "callid",
        "user_agent",
        "instance",
        "expires",
        "cseq",
        "flags",
        "cflags",
        "q",
        "last_modified",
        "methods",
        "reg_id",
        "server_id",
    }
)
"""The keys a 5.6.3 dmq_usrloc receiver reads (others are logged and skipped)."""

_USRLOC_STRINGS = (
    ("aor", "aor"),
    ("ruid", "ruid"),
    ("c", "contact"),
    ("received", "received"),
    ("path", "path"),
    ("callid", "callid"),
    ("user_agent", "userAgent"),
    ("instance", "instance"),
)
_USRLOC_NUMBERS = (
    ("expires", "expires"),
    ("cseq", "cseq"),
    ("flags", "flags"),
    ("cflags", "cflags"),
    ("q", "q"),
    ("last_modified", "lastModified"),
    ("methods", "methods"),
    ("reg_id", "regId"),
    ("server_id", "serverId"),
)


def _decodeContactObject(obj: _Object) -> UsrlocItem:
    """
    One usrloc action (5.6.3's C{usrloc_dmq_execute_action}).

    @raise _BadRequest: an action other than 0-3, or a string key holding
        something else.
    """
    fields: dict[str, Any] = {attr: _string(obj, key, "usrloc") for key, attr in _USRLOC_STRINGS}
    sock = obj.get("sock")
    fields["sock"] = _clean(sock) if isinstance(sock, str) else None
    for key, attr in _USRLOC_NUMBERS:
        fields[attr] = _number(obj.get(key))
    action = _unsigned(_number(obj.get("action")))
    if action == UL_UPDATE:
        return Contact(**fields)
    if action == UL_RM:
        return ContactRemove(**fields)
    if action == UL_SYNC:
        return UsrlocSync()
    if action == UL_NONE:
        return UsrlocNoop()
    raise _BadRequest(f"unknown usrloc action {action}")


def decodeUsrloc(body: bytes, maxBatchItems: int | None = None) -> Decoded:
    """
    Decode a C{usrloc} body (spec §6.3) as 5.6.3's C{usrloc_dmq_handle_msg}
    reads it: a batch when the first key is C{multi} (its members, in order,
    duplicates included; a member that is not an object is a NONE, as in
    5.6.3), else one action. Items after the first C{maxBatchItems} are not
    decoded (counted in C{truncated}). Never raises.
    """
    try:
        root = _parse(body)
    except _BadRequest as e:
        return Decoded(badRequest=e.reason)
    if isinstance(root, list):
        reason = "an array with members" if root else "an empty array"
        return Decoded(badRequest=f"usrloc body is {reason}", hostile=True)
    if not isinstance(root, _Object) or not root.pairs:
        return Decoded(badRequest="usrloc body has no first member", hostile=True)
    if root.pairs[0][0] != "multi":
        try:
            item = _decodeContactObject(root)
        except _BadRequest as e:
            return Decoded(badRequest=e.reason, hostile=e.hostile)
        return Decoded(
            items=(item,),
            unknownKeys=_uniq(_unknown(root, USRLOC_KEYS)),
            duplicateKeys=tuple(root.duplicates()),
        )
    batch = root.pairs[0][1]
    members: list[Any]
    duplicates: list[str] = []
    if isinstance(batch, _Object):
        members = [value for _, value in batch.pairs]
        duplicates.extend(batch.duplicates())
    elif isinstance(batch, list):
        members = batch
    else:
        members = []
    truncated = 0
    if maxBatchItems is not None and len(members) > maxBatchItems:
        truncated = len(members) - maxBatchItems
        members = members[:maxBatchItems]
    items: list[ChannelItem] = []
    unknown: list[str] = []
    for member in members:
        obj = member if isinstance(member, _Object) else _Object([])
        try:
            items.append(_decodeContactObject(obj))
        except _BadRequest as e:
            return Decoded(
                items=tuple(items),
                badRequest=e.reason,
                hostile=e.hostile,
                unknownKeys=_uniq(unknown),
                duplicateKeys=_uniq(duplicates),
                batched=True,
            )
        unknown.extend(_unknown(obj, USRLOC_KEYS))
        duplicates.extend(obj.duplicates())
    return Decoded(
        items=tuple(items),
        unknownKeys=_uniq(unknown),
        duplicateKeys=_uniq(duplicates),
        batched=True,
        truncated=truncated,
    )


# ---------------------------------------------------------------------------
# presence


PRESENCE_KEYS = frozenset({"action", "presentity", "t_new", "cur_etag", "sphere", "ruid", "body"})
"""The only top-level keys a 5.6.3 presence receiver accepts (else 400)."""

PRESENTITY_KEYS = frozenset({"domain", "user", "etag", "expires", "recv", "sender", "event"})
"""The only presentity keys a 5.6.3 presence receiver accepts (else 400)."""


def _decodePresentity(value: object) -> Presentity:
    """
    The presentity as 5.6.3's C{pres_parse_json_presentity} reads it.

    @raise _BadRequest: an unknown key, no event or an empty one, a string
        key holding something else, or an array with members (hostile).
    """
    if isinstance(value, list):
        if value:
            raise _BadRequest("presentity is an array with members", hostile=True)
        value = _Object([])
    if not isinstance(value, _Object):
        value = _Object([])
    unknown = _unknown(value, PRESENTITY_KEYS)
    if unknown:
        raise _BadRequest(f"unknown presentity key {unknown[0]!r}")
    strings = {key: _string(value, key, "presentity") for key in ("domain", "user", "etag")}
    sender = _string(value, "sender", "presentity")
    event = _string(value, "event", "presentity")
    if not event:
        raise _BadRequest("presentity without event")
    return Presentity(
        **strings,
        expires=_number(value.get("expires")),
        recv=_number(value.get("recv")),
        sender=sender,
        event=event,
    )


def decodePresence(body: bytes) -> Decoded:
    """
    Decode a C{presence} body (spec §6.4) as 5.6.3's C{pres_dmq_handle_msg}
    reads it: every key must be known, the presentity is read whatever the
    action. Never raises.
    """
    try:
        root = _parse(body)
        if isinstance(root, list) and root:
            raise _BadRequest("presence body is an array with members", hostile=True)
        obj = root if isinstance(root, _Object) else _Object([])
        unknown = _unknown(obj, PRESENCE_KEYS)
        if unknown:
            raise _BadRequest(f"unknown presence key {unknown[0]!r}")
        presentity = _decodePresentity(obj.get("presentity")) if "presentity" in obj else None
        curEtag = _string(obj, "cur_etag", "presence")
        ruid = _string(obj, "ruid", "presence")
        text = _string(obj, "body", "presence")
    except _BadRequest as e:
        return Decoded(badRequest=e.reason, hostile=e.hostile)
    sphere = obj.get("sphere")
    action = _number(obj.get("action"))
    item: PresenceItem
    if action == PRES_UPDATE_PRESENTITY:
        item = PresentityUpdate(
            presentity=presentity,
            tNew=_number(obj.get("t_new")),
            curEtag=curEtag,
            sphere=_clean(sphere) if isinstance(sphere, str) else None,
            ruid=ruid,
            body=text or None,
        )
    elif action == PRES_SYNC:
        item = PresenceSync(presentity)
    else:
        item = PresenceNoop(action, presentity)
    return Decoded(items=(item,), duplicateKeys=tuple(obj.duplicates()))


def presenceRefusal(item: ChannelItem) -> str | None:
    """Why 5.6.3 answers 500: an UPDATE_PRESENTITY without presentity. None for 200."""
    if isinstance(item, PresentityUpdate) and item.presentity is None:
        return "update without presentity"
    return None


def _neverRefused(item: ChannelItem) -> str | None:
    """5.6.3's dmq_usrloc never answers 500 (store and delete results are ignored)."""
    return None


# ---------------------------------------------------------------------------
# Byte forms and dicts


def valueBytes(text: str) -> bytes:
    """The bytes a decoded string stands for (UTF-8, raw bytes given back)."""
    return text.encode("utf-8", "surrogateescape")


def itemDict(item: ChannelItem, maxChars: int | None = None) -> dict[str, Any]:
    """
    An item as a JSON-ready dict: C{kind} first, then its fields by name;
    dialog C{vars} as an object, profiles and presentity as objects. Strings
    longer than C{maxChars} are cut there and end with C{…}.
    """

    def cut(value: Any) -> Any:
        if isinstance(value, str) and maxChars is not None and len(value) > maxChars:
            return value[:maxChars] + "…"
        if isinstance(value, dict):
            return {k: cut(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [cut(v) for v in value]
        return value

    fields = attrs.asdict(item, recurse=True)
    if isinstance(item, DialogUpdate):
        fields["vars"] = dict(item.vars)
    return {"kind": item.kind, **{k: cut(v) for k, v in fields.items()}}


# ---------------------------------------------------------------------------
# The observers


@attrs.frozen
class Observation:
    """
    One decoded action received on an observed channel.

    @ivar sender: the sending node (its URI) when it is a known node, else
        the address the message came from.
    @ivar at: the clock time it was received.
    @ivar batched: whether it came in a usrloc C{{"multi":...}} batch.
    """

    channel: str
    item: ChannelItem
    sender: str
    at: float
    batched: bool = False

    def asDict(self, maxChars: int | None = None) -> dict[str, Any]:
        """The observation as a JSON-ready dict (see L{itemDict})."""
        return {
            "at": self.at,
            "sender": self.sender,
            "batched": self.batched,
            "item": itemDict(self.item, maxChars),
        }


def _positive(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be positive, not {value}")


@attrs.frozen
class ObserverLimits:
    """Every limit of an observer, with its behaviour at the edge."""

    recent: int = attrs.field(default=100, validator=_positive)
    """
    Items kept in the record (L{IObservedChannel.recent}). At the limit
    the oldest is forgotten as a new one arrives; the counts go on.
    """

    maxBatchItems: int = attrs.field(default=10_000, validator=_positive)
    """
    Items decoded from one usrloc C{{"multi":...}} batch. Kamailio fills a
    batch up to ~60,000 bytes (about 300 contacts); past the limit the rest
    are not decoded nor observed, counted in C{usrloc.in.batch_truncated}
    and logged; the message is still answered 200.
    """

    summaryChars: int = attrs.field(default=256, validator=_positive)
    """
    Characters of one string in L{IObservedChannel.summary}: longer ones
    are cut there (and end with C{…}), so C{dmq.stats} stays small. The
    record itself keeps whole values.
    """


@attrs.frozen
class ChannelCodec:
    """
    How one channel is read and answered.

    @ivar decode: body to L{Decoded}, never raising; takes the batch limit.
    @ivar refusal: why 5.6.3 answers an item 500, or None.
    """

    channel: str
    description: str
    decode: Callable[[bytes, int], Decoded]
    refusal: Callable[[ChannelItem], str | None]


DIALOG_CODEC = ChannelCodec(
    DIALOG,
    "observes Kamailio's replicated dialogs (read-only)",
    lambda body, limit: decodeDialog(body),
    dialogRefusal,
)
USRLOC_CODEC = ChannelCodec(
    USRLOC,
    "observes Kamailio's replicated registrations, dmq_usrloc (read-only)",
    decodeUsrloc,
    _neverRefused,
)
PRESENCE_CODEC = ChannelCodec(
    PRESENCE,
    "observes Kamailio's replicated presentities (read-only)",
    lambda body, limit: decodePresence(body),
    presenceRefusal,
)

_OK = PeerResponse(200, "OK")
_BAD_REQUEST = PeerResponse(400, "Bad Request")
_INTERNAL_ERROR = PeerResponse(500, "Server Internal Error")


@implementer(IDMQPeer, IObservedChannel)
class ChannelObserver:
    """
    The peer of one observed channel: decodes each message with its
    L{ChannelCodec}, answers as 5.6.3 would (see the module docstring),
    records the items and tells the observers. Holds nothing else, sends
    nothing.

    Counters (merged into C{dmq.stats} by the node), C{CHANNEL.} first:
    C{in.messages}; C{in.KIND} per item kind; C{in.batches};
    C{in.bad_request} (400, C{in.hostile} among them: bodies that crash
    5.6.3); C{in.refused} (500); C{in.errors} (our own bug: 500);
    C{in.unknown_keys}, C{in.duplicate_keys} (messages holding any);
    C{in.batch_truncated} (items); C{observer_errors}.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        codec: ChannelCodec,
        limits: ObserverLimits = ObserverLimits(),
    ) -> None:
        self.clock = clock
        self.codec = codec
        self.limits = limits
        self.channel = codec.channel
        self.description = codec.description
        self.counters: Counter[str] = Counter()
        self._kinds: Counter[str] = Counter()
        self._answers: Counter[int] = Counter()
        self._recent: deque[Observation] = deque(maxlen=limits.recent)
        self._observers: list[Callable[[Observation], None]] = []
        self._prefix = codec.channel + "."

    # -- IDMQPeer

    def busJoined(self) -> None:
        """Nothing: an observer holds nothing, so it never asks for a sync."""

    def messageReceived(self, message: DMQMessage) -> PeerResponse:
        """Decode, record, notify and answer; never raises."""
        try:
            response = self._handle(message)
        except Exception:
            self._count("in.errors")
            self.log.failure(
                "{channel} message from {origin} failed",
                channel=self.channel,
                origin=str(message.origin.address),
            )
            response = _INTERNAL_ERROR
        self._answers[response.code] += 1
        return response

    # -- IObservedChannel

    def addObserver(self, observer: Callable[[Observation], None]) -> Callable[[], None]:
        self._observers.append(observer)

        def remove() -> None:
            if observer in self._observers:
                self._observers.remove(observer)

        return remove

    def counts(self) -> dict[str, int]:
        return dict(self._kinds)

    def recent(self) -> list[Observation]:
        return list(self._recent)

    def summary(self) -> dict[str, Any]:
        return {
            "channel": self.channel,
            "messages": self.counters[self._prefix + "in.messages"],
            "counts": dict(self._kinds),
            "answers": {str(code): n for code, n in sorted(self._answers.items())},
            "limit": self.limits.recent,
            "recent": [o.asDict(self.limits.summaryChars) for o in self._recent],
        }

    # -- internals

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[self._prefix + name] += n

    def _handle(self, message: DMQMessage) -> PeerResponse:
        self._count("in.messages")
        decoded = self.codec.decode(message.body, self.limits.maxBatchItems)
        origin = str(message.origin.address)
        sender = str(message.sender) if message.sender is not None else origin
        if decoded.unknownKeys:
            self._count("in.unknown_keys")
            self.log.debug(
                "{channel}: unrecognized key(s) {keys} from {sender}",
                channel=self.channel,
                keys=", ".join(decoded.unknownKeys),
                sender=sender,
            )
        if decoded.duplicateKeys:
            self._count("in.duplicate_keys")
        if decoded.batched:
            self._count("in.batches")
        if decoded.truncated:
            self._count("in.batch_truncated", decoded.truncated)
            self.log.warn(
                "{channel}: batch from {sender} over maxBatchItems, {n} items not observed",
                channel=self.channel,
                sender=sender,
                n=decoded.truncated,
            )
        refusal = None
        now = self.clock.seconds()
        for item in decoded.items:
            self._observe(Observation(self.channel, item, sender, now, decoded.batched))
            if refusal is None:
                refusal = self.codec.refusal(item)
        if decoded.badRequest is not None:
            self._count("in.bad_request")
            if decoded.hostile:
                self._count("in.hostile")
            self.log.debug(
                "{channel}: 400 to {sender}: {reason}",
                channel=self.channel,
                sender=sender,
                reason=decoded.badRequest,
            )
            return _BAD_REQUEST
        if refusal is not None:
            self._count("in.refused")
            self.log.debug(
                "{channel}: 500 to {sender}: {reason}",
                channel=self.channel,
                sender=sender,
                reason=refusal,
            )
            return _INTERNAL_ERROR
        return _OK

    def _observe(self, observation: Observation) -> None:
        kind = observation.item.kind
        self._kinds[kind] += 1
        self._count("in." + kind)
        self._recent.append(observation)
        for observer in list(self._observers):
            try:
                observer(observation)
            except Exception:
                self._count("observer_errors")
                self.log.failure(
                    "observer of channel {channel} failed on a {kind}",
                    channel=self.channel,
                    kind=kind,
                )


class DialogObserver(ChannelObserver):
    """Observes channel C{dialog} (Kamailio's dialog module, C{enable_dmq=1})."""

    def __init__(self, clock: IReactorTime, limits: ObserverLimits = ObserverLimits()) -> None:
        super().__init__(clock, DIALOG_CODEC, limits)


class UsrlocObserver(ChannelObserver):
    """Observes channel C{usrloc} (Kamailio's dmq_usrloc module, C{enable=1})."""

    def __init__(self, clock: IReactorTime, limits: ObserverLimits = ObserverLimits()) -> None:
        super().__init__(clock, USRLOC_CODEC, limits)


class PresenceObserver(ChannelObserver):
    """Observes channel C{presence} (Kamailio's presence module, C{enable_dmq=1})."""

    def __init__(self, clock: IReactorTime, limits: ObserverLimits = ObserverLimits()) -> None:
        super().__init__(clock, PRESENCE_CODEC, limits)


# ---------------------------------------------------------------------------
# Plugins


def parseObserverOptions(text: str) -> ObserverLimits:
    """
    C{--peer NAME=OPTIONS} for an observer: C{;}-separated C{recent=N},
    C{maxBatchItems=N}, C{summaryChars=N} (positive integers); empty for
    the defaults.

    @raise ValueError: an unknown option or a bad value.
    """
    values: dict[str, int] = {}
    names = [a.name for a in attrs.fields(ObserverLimits)]
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        key, eq, value = (s.strip() for s in part.partition("="))
        if key not in names:
            raise ValueError(f"observer option {key!r} unknown (known: {', '.join(names)})")
        if not eq or not value.isdigit() or int(value) <= 0:
            raise ValueError(f"observer option {key!r} needs a positive integer")
        values[key] = int(value)
    return ObserverLimits(**values)


@implementer(IPlugin, IDMQPeerFactory)
class ObserverFactory:
    """
    C{--peer NAME[=recent=N;maxBatchItems=N;summaryChars=N]}: an observer
    of channel NAME (C{dialog}, C{usrloc} or C{presence}).
    """

    peerClass: ClassVar[type[DialogObserver | UsrlocObserver | PresenceObserver]]
    name: ClassVar[str]

    @property
    def description(self) -> str:
        """One line for C{--help}."""
        return f"observe Kamailio's '{self.name}' channel, read-only (=recent=100)"

    def makePeer(self, bus: IDMQBus, options: str) -> IDMQPeer:
        return self.peerClass(bus.clock, parseObserverOptions(options))


class DialogObserverFactory(ObserverFactory):
    """C{--peer dialog}: a L{DialogObserver}."""

    peerClass = DialogObserver
    name = DIALOG


class UsrlocObserverFactory(ObserverFactory):
    """C{--peer usrloc}: a L{UsrlocObserver}."""

    peerClass = UsrlocObserver
    name = USRLOC


class PresenceObserverFactory(ObserverFactory):
    """C{--peer presence}: a L{PresenceObserver}."""

    peerClass = PresenceObserver
    name = PRESENCE


__all__ = [
    "CONTENT_TYPE",
    "DIALOG_CODEC",
    "DIALOG_KEYS",
    "PRESENCE_CODEC",
    "PRESENCE_KEYS",
    "PRESENTITY_KEYS",
    "USRLOC_CODEC",
    "USRLOC_KEYS",
    "ChannelCodec",
    "ChannelItem",
    "ChannelObserver",
    "Contact",
    "ContactFields",
    "ContactRemove",
    "Decoded",
    "DialogNoop",
    "DialogObserver",
    "DialogObserverFactory",
    "DialogProfile",
    "DialogRemove",
    "DialogState",
    "DialogSync",
    "DialogUpdate",
    "IObservedChannel",
    "Observation",
    "ObserverFactory",
    "ObserverLimits",
    "PresenceNoop",
    "PresenceObserver",
    "PresenceObserverFactory",
    "PresenceSync",
    "Presentity",
    "PresentityUpdate",
    "UsrlocNoop",
    "UsrlocObserver",
    "UsrlocObserverFactory",
    "UsrlocSync",
    "decodeDialog",
    "decodePresence",
    "decodeProfiles",
    "decodeUsrloc",
    "dialogRefusal",
    "itemDict",
    "parseObserverOptions",
    "presenceRefusal",
    "valueBytes",
]
