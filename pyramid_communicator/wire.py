"""The wire format, compatible with the Ruby ``communicator`` gem.

A message on the wire is ``{"id", "body", "origin", "original_id"}``:
``id`` is the sender's outbound message id, ``body`` a JSON *string*
``{"<name>": {attribute: value}}``, and (origin, original_id) the
identity of the record.  Requests and replies are JSON arrays of these.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import zlib
from collections.abc import Iterable
from typing import Any

from . import link_bodies
from .link_bodies import LINK
from .message_bodies import PLAIN, check_fields
from .records import decode_body
from .signatures import sign, well_formed
from .versions import HERE, valid_wire_version

#: Response header: our server has more pending messages than it returned.
MORE_HEADER = 'X-Communicator-More'
#: Header naming the app that sends a request or a reply.
NAME_HEADER = 'X-Communicator-Name'
#: Response header: this server understands acknowledgements (our
#: extension); a gem server does not send it.  From ``2`` on it also takes
#: gzip-compressed request bodies.
PROTOCOL_HEADER = 'X-Communicator-Protocol'
PROTOCOL_VERSION = '2'
#: The newest format of the messages this version reads and writes, sent
#: as each message's ``"format"`` key.  The gem's messages have none:
#: format 1.  A receiver keeps a message of a newer format than its own
#: unapplied until it is upgraded (see :mod:`.inbox`), so a sender may
#: upgrade first.
FORMAT_VERSION = 4
#: The format records are written in: unchanged since 0.2.0's versions,
#: so that a peer of that version applies them.
RECORD_FORMAT = 2
#: The format of plain messages (:mod:`.messages`): newer than records,
#: so that a peer that predates them keeps them waiting for its upgrade
#: instead of failing them.
MESSAGE_FORMAT = 3
#: The format of records whose primary key is their identity (:mod:`.keys`):
#: their body carries the key and ``original_id`` is its handle, which a
#: peer that predates them would take for an id and apply wrongly; it keeps
#: them waiting for its upgrade instead.
KEYED_FORMAT = 4
#: The format of many-to-many link messages (:mod:`.links`): newer than
#: plain messages, so that a peer that predates links keeps them waiting
#: for its upgrade instead of failing them.
LINK_FORMAT = 4
#: zlib level for bodies between our own apps: cheap on CPU, and JSON of
#: records still shrinks severalfold.
GZIP_LEVEL = 1


def gzip_body(payload: bytes) -> bytes:
    return gzip.compress(payload, compresslevel=GZIP_LEVEL, mtime=0)


class TooLarge(ValueError):
    """A body that is, or decompresses to, more than the limit."""


def gunzip_body(payload: bytes, limit: int) -> bytes:
    """Decompress, refusing more than ``limit`` bytes of output (a small
    body must not unpack into gigabytes)."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(payload, limit + 1)
    except zlib.error as exc:
        raise WireError(f'malformed gzip body: {exc}') from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise TooLarge(f'request body over {limit} bytes once decompressed')
    if not inflater.eof:
        raise WireError('truncated gzip body')
    return out


class WireError(ValueError):
    """Input that does not follow the wire format; the message is one line
    that is safe to show to the sender."""


@dataclasses.dataclass(frozen=True)
class WireMessage:
    id: int
    body: str
    origin: str | None
    original_id: int | None
    #: Our extension: ``{column: [origin, original_id]}`` of the records the
    #: foreign keys point at (the gem ignores the key).
    refs: dict[str, list] | None = None
    #: Our extension: the record's version, ``{"clock": {app: hlc},
    #: "stamps": {attribute: [hlc, app]}}`` or, for a delete, ``{"clock":
    #: ..., "deleted": [hlc, app]}`` (see :mod:`.versions`).
    version: dict[str, Any] | None = None
    #: Our extension: the format the sender wrote the message in (absent
    #: on the wire: 1, the gem's).
    format: int = 1
    #: Our extension: the origin's signature of a record message it
    #: published (:mod:`.signatures`); a peer keeps it, and sends it back
    #: in an echo (:mod:`.echoes`).  Optional: the gem sends none.
    signature: str | None = None
    #: ``records.decode_body(body)``, kept by :func:`parse_messages` (which
    #: decodes each body to check it): the receiver applies the batch it
    #: just stored without decoding it again.  Not on the wire.
    decoded: tuple[str, dict[str, Any]] | None = dataclasses.field(
        default=None, compare=False, repr=False)
    #: Not on the wire: why the message was refused (one line, safe to
    #: show), None for a well-formed one.  A refused message keeps only its
    #: id, and its JSON in ``body`` for the operator; it is stored refused
    #: and never applied.
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = {'id': self.id, 'body': self.body, 'origin': self.origin,
                'original_id': self.original_id, 'format': self.format}
        if self.refs:
            data['refs'] = self.refs
        if self.version is not None:
            data['version'] = self.version
        if self.signature is not None:
            data['signature'] = self.signature
        return data


def outbound_to_wire(row: Any, local_name: str, key: bytes | None = None) -> WireMessage:
    """An ``outbound_messages`` row as sent; a NULL origin means this app.

    With ``key`` (:func:`.echoes.signing_key`), every versioned record
    message this app authored is signed, whatever the record's origin (its
    edits and deletes of the peer's records too: a restore of this app
    loses them as well); an echo carries the signature it was stored with."""
    origin = row.origin
    if origin is None and row.original_id is not None:
        origin = local_name
    refs = None
    if getattr(row, 'refs', None):
        refs = {column: [ref_origin or local_name, ref_id]
                for column, (ref_origin, ref_id) in json.loads(row.refs).items()}
    version = None
    if getattr(row, 'version', None):
        version = _named(json.loads(row.version), local_name)
    message_format = getattr(row, 'format', None) or 1
    body = row.body
    if message_format == LINK_FORMAT and body.startswith(f'{{"{LINK}"'):
        body = link_bodies.named(body, local_name)
    signature = getattr(row, 'signature', None)
    if signature is None and key is not None and row.original_id is not None \
            and version is not None:
        signature = sign(key, origin, row.original_id, body, version, refs)
    return WireMessage(row.id, body, origin, row.original_id, refs, version,
                       message_format, signature)


def _named(version: dict[str, Any], local_name: str) -> dict[str, Any]:
    """A stored version with this app (``''``) named."""
    def name(app: str) -> str:
        return local_name if app == HERE else app
    named = {'clock': {name(app): hlc for app, hlc in version['clock'].items()}}
    if version.get('life'):
        named['life'] = version['life']
    if version.get('deleted'):
        named['deleted'] = [version['deleted'][0], name(version['deleted'][1])]
    else:
        named['stamps'] = {key: [hlc, name(app)]
                           for key, (hlc, app) in version.get('stamps', {}).items()}
    return named


_compact = json.JSONEncoder(separators=(',', ':'), ensure_ascii=False).encode


def dumps(messages: Iterable[WireMessage]) -> bytes:
    return _compact([m.to_json() for m in messages]).encode('utf-8')


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _storable(text: str) -> bool:
    """Text every database stores: encodable as UTF-8 (JSON escapes can
    make lone surrogates) and without NUL (PostgreSQL refuses it)."""
    if text.isascii():  # most text, checked without encoding a copy
        return '\x00' not in text
    try:
        text.encode('utf-8')
    except UnicodeEncodeError:
        return False
    return '\x00' not in text


#: :func:`_storable` for other modules.
def storable(text: str) -> bool:
    return _storable(text)


def parse_json(raw: bytes | str) -> Any:
    try:
        return json.loads(raw)
    except RecursionError:
        raise WireError('JSON is nested too deeply') from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise WireError(f'malformed JSON: {exc}') from None


class ParsedMessages(list[WireMessage]):
    """The messages of one array, in order (a plain list of
    :class:`WireMessage` to code that needs no more), and how many items
    were ``skipped``: without a usable id, they can be neither stored nor
    acknowledged, so nothing of them is kept."""

    skipped: int = 0

    @property
    def refused(self) -> int:
        """How many messages came back refused (``error`` set)."""
        return sum(1 for message in self if message.error is not None)


class _Malformed(ValueError):
    """One message does not follow the wire format (the reason, one line)."""


#: How much of a refused message is kept in its ``body``, for the operator.
REFUSED_BODY_CHARS = 4000


def parse_messages(raw: bytes | str) -> ParsedMessages:
    """Parse an array of messages, refusing malformed ones one by one.

    Only a body that is not a JSON array at all is a :class:`WireError`.
    A message with a usable id (a positive integer, once in the array) that
    is otherwise malformed comes back with ``error`` set: it is stored
    refused and acknowledged like the others, so the peer moves on and the
    valid messages beside it are applied.  Items without a usable id are
    skipped and counted (:attr:`ParsedMessages.skipped`)."""
    data = parse_json(raw)
    if not isinstance(data, list):
        raise WireError('expected a JSON array of messages')
    ids = [_usable_id(item) for item in data]
    counts: dict[int, int] = {}
    for message_id in ids:
        if message_id is not None:
            counts[message_id] = counts.get(message_id, 0) + 1
    messages = ParsedMessages()
    for item, message_id in zip(data, ids, strict=True):
        # An id twice: which one is the message?  Neither is kept.
        if message_id is None or counts[message_id] > 1:
            messages.skipped += 1
            continue
        try:
            messages.append(_parse_message(item, message_id))
        except _Malformed as exc:
            messages.append(WireMessage(message_id, _refused_body(item), None, None,
                                        error=str(exc)))
    return messages


def _usable_id(item: Any) -> int | None:
    if not isinstance(item, dict):
        return None
    message_id = item.get('id')
    if not _is_int(message_id) or not 0 < message_id < 2 ** 63:
        return None
    return message_id


def _refused_body(item: dict[str, Any]) -> str:
    """The refused message as JSON, for the operator to look at: ASCII
    (escapes keep lone surrogates and NUL out of the database), cut to
    :data:`REFUSED_BODY_CHARS`.  Never a record body: it is an object with
    an ``"id"`` besides anything else, which ``decode_body`` refuses, so a
    refused message that an operator revives fails instead of applying."""
    try:
        text = json.dumps(item, ensure_ascii=True, separators=(',', ':'))
    except (RecursionError, ValueError):
        return json.dumps({'id': item.get('id'), 'unprintable': True})
    return text[:REFUSED_BODY_CHARS]


def _parse_message(item: dict[str, Any], message_id: int) -> WireMessage:
    """One message of a usable id, or :class:`_Malformed` saying why not."""
    message_format = item.get('format')
    if message_format is None:  # the gem's, or a sender's explicit null
        message_format = 1
    if not _is_int(message_format) or not 0 < message_format < 2 ** 31:
        raise _Malformed('"format" must be a positive integer')
    # A newer format than ours may say things differently: store what
    # the columns need, and check the rest once we understand it.
    known = message_format <= FORMAT_VERSION
    body = item.get('body')
    if not isinstance(body, str):
        raise _Malformed('"body" must be a string')
    if not _storable(body):
        raise _Malformed('"body" must be UTF-8 text without NUL characters')
    decoded = None
    try:
        if known:
            decoded = decode_body(body)
    except RecursionError:
        raise _Malformed('"body" is nested too deeply') from None
    except ValueError as exc:
        raise _Malformed(f'"body" is not a record: {_one_line(exc)}') from None
    if decoded is not None and decoded[0] == PLAIN:
        _check_plain(item, decoded[1], message_format)
    if decoded is not None and decoded[0] == LINK:
        _check_link(item, decoded[1], message_format)
    origin = item.get('origin')
    if origin is not None and not (isinstance(origin, str) and 0 < len(origin) <= 64
                                   and _storable(origin)):
        raise _Malformed('"origin" must be a string of 1-64 characters or null')
    original_id = item.get('original_id')
    if original_id is not None and not (_is_int(original_id) and abs(original_id) < 2 ** 63):
        raise _Malformed('"original_id" must be an integer or null')
    refs = item.get('refs')
    if refs is not None and known and not _valid_refs(refs):
        raise _Malformed('"refs" must map column names to [origin, id]')
    version = item.get('version')
    if version is not None and known and not valid_wire_version(version):
        raise _Malformed('"version" must be {"clock": {app: hlc}, '
                         '"stamps": {attribute: [hlc, app]}} or a deletion')
    signature = item.get('signature')
    if signature is not None and not well_formed(signature):
        raise _Malformed('"signature" must be 64 lowercase hex digits or null')
    return WireMessage(message_id, body, origin, original_id, refs or None,
                       version, message_format, signature, decoded)


def _check_plain(item: dict[str, Any], fields: Any, message_format: int) -> None:
    """A plain message (:mod:`.message_bodies`): in its format, without a
    record's identity, version or references, and well-formed."""
    if message_format < MESSAGE_FORMAT:
        raise _Malformed(f'a {PLAIN} body needs format {MESSAGE_FORMAT} or newer')
    if any(item.get(key) is not None for key in ('origin', 'original_id', 'refs', 'version')):
        raise _Malformed(f'a {PLAIN} has no origin, original_id, refs or version')
    try:
        check_fields(fields)
    except ValueError as exc:
        raise _Malformed(_one_line(exc)) from None


def _check_link(item: dict[str, Any], fields: Any, message_format: int) -> None:
    """A link message (:mod:`.link_bodies`): in its format, without a
    record's identity, version or references (it names its two records
    itself), and well-formed."""
    if message_format < LINK_FORMAT:
        raise _Malformed(f'a {LINK} body needs format {LINK_FORMAT} or newer')
    if any(item.get(key) is not None for key in ('origin', 'original_id', 'refs', 'version')):
        raise _Malformed(f'a {LINK} has no origin, original_id, refs or version')
    try:
        link_bodies.check_fields(fields)
    except ValueError as exc:
        raise _Malformed(_one_line(exc)) from None


def _one_line(value: object, limit: int = 200) -> str:
    """A reason safe to show and store: one line, printable, short."""
    text = ' '.join(str(value).split())
    return ''.join(c if c.isprintable() else '?' for c in text)[:limit]


def _valid_refs(refs: Any) -> bool:
    if not isinstance(refs, dict) or len(refs) > 100:
        return False
    return all(
        isinstance(column, str) and 0 < len(column) <= 64 and _storable(column)
        and isinstance(ref, list) and len(ref) == 2
        and isinstance(ref[0], str) and 0 < len(ref[0]) <= 64 and _storable(ref[0])
        and _is_int(ref[1]) and abs(ref[1]) < 2 ** 63
        for column, ref in refs.items())


def parse_ids(raw: bytes | str, limit: int | None = None) -> list[int]:
    """The body of an acknowledgement: ``{"ids": [1, 2, ...]}``, of at
    most ``limit`` ids (a peer acknowledges one reply at a time; a longer
    list only makes the database work)."""
    data = parse_json(raw)
    ids = data.get('ids') if isinstance(data, dict) else None
    if not isinstance(ids, list) or not all(_is_int(i) and 0 < i < 2 ** 63 for i in ids):
        raise WireError('expected {"ids": [positive integers]}')
    if limit is not None and len(ids) > limit:
        raise WireError(f'at most {limit} ids per acknowledgement')
    return ids
