"""How a record's primary key is read, written, encoded and found.

Two kinds of model take part in the sync:

*Surrogate-keyed* (a single integer primary key that the database hands
out: ``autoincrement`` not ``False``).  The key means nothing outside
its database: the record travels as ``(origin, original_id)``, the id
it has in its origin, and every other app maps that identity onto a
record of its own with its own id.  This is the gem's wire format,
unchanged.

*Keyed* (any other primary key: a UUID, a string such as a currency
code or a slug, an integer the app chooses, ``autoincrement=False``, or
a composite key).  The key is the record's identity: it keeps its value
on every side.  Such a model is treated as if it had
``match_on=[its primary key attributes]``, and its key attributes cross
the wire in the body like any other column (a part that is a foreign key
to a synced model translates through ``refs``, as foreign keys do).  So
a create carries the key and the receiver creates the record under the
same key, two sides creating one key concurrently meet as one record
(merged by the model's policy), a delete is kept by its key (a natural-key
tombstone), and the trust rule of ``match_on`` holds: a create, update or
delete naming the key of a local record that was never shared with the
peer is refused.  Keys never change: a message that would give a mapped
record another key is refused.

The mapping rows (``communicator_mappings``) and the wire keep their
integer ``original_id``/``local_id``, so that verify's ranges, tombstones,
restores and every query over them work unchanged.  For a keyed record
that integer is its *handle*: a 62-bit hash of the key's canonical text
(:func:`text`), the same on every side for the same key.  The text itself
is kept in ``local_key`` (migration ``communicator_0004``), which is how
the record is found again from its mapping row; lookups go by the handle
(indexed with the name), so ``local_key`` needs no index of its own.  Two
keys with one handle would be taken for one record; with 62 bits that
takes about 2**31 records of one model to become likely, far beyond what
the add-on is built for (documented in docs/models.rst).

Keyed records travel in wire format :data:`.wire.KEYED_FORMAT`: a peer
that predates them would take the handle for an id, so it keeps them
waiting for its upgrade.  The trust checks are those of ``match_on``
(:mod:`.applying` calls :func:`handle` and :func:`text`; it adds only the
rule that a record's key never changes).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy import and_, inspect, or_, tuple_
from sqlalchemy.orm import Session

from .records import Receiver, from_wire, python_type, to_wire

#: The longest canonical key text kept (``communicator_mappings.local_key``).
MAX_KEY = 255

_compact = json.JSONEncoder(separators=(',', ':'), ensure_ascii=False).encode


class BadKey(ValueError):
    """A key that cannot be a record's identity (missing part, too long)."""


def keyed(cls: type) -> bool:
    """Is the primary key the identity (anything but one integer column
    the database hands out)?"""
    columns = list(inspect(cls).primary_key)
    if len(columns) != 1:
        return True
    column = columns[0]
    return python_type(column.type) is not int or column.autoincrement is False


def values_of(receiver: Receiver, obj: object) -> tuple | None:
    """The record's key values as set on it (before or after a flush);
    None if a part is still missing."""
    state = inspect(obj)
    parts = []
    for key in receiver.primary_key:
        value = state.dict.get(key)
        if value is None and state.has_identity and key not in state.dict:
            value = getattr(obj, key)
        if value is None:
            return None
        parts.append(receiver.canonical(key, value) if key in receiver.columns() else value)
    return tuple(parts)


def text(values: tuple) -> str:
    """The canonical text of key values: JSON of their wire values (a list
    for a composite key).  The same on every side and backend."""
    wire = [to_wire(value) for value in values]
    found = _compact(wire[0] if len(wire) == 1 else wire)
    if len(found) > MAX_KEY:
        raise BadKey(f'a primary key longer than {MAX_KEY} characters as text cannot be '
                     f'synced: {found[:40]}...')
    return found


def handle_of(key_text: str) -> int:
    """The integer standing for a keyed record in mappings and on the wire."""
    digest = hashlib.blake2b(key_text.encode(), digest_size=8).digest()
    return (int.from_bytes(digest, 'big') >> 2) or 1


def handle(receiver: Receiver, obj: object) -> int | None:
    """The record's local id as the sync metadata knows it: its primary
    key (surrogate-keyed), or the handle of its key (keyed); None while
    it has none."""
    if not receiver.keyed:
        identity = inspect(obj).identity
        if identity is None or len(identity) != 1:
            return None
        return identity[0]
    values = values_of(receiver, obj)
    return None if values is None else handle_of(text(values))


def text_of(receiver: Receiver, obj: object) -> str | None:
    """``local_key`` of a record: its key's text (keyed models), else None."""
    if not receiver.keyed:
        return None
    values = values_of(receiver, obj)
    return None if values is None else text(values)


def parse(receiver: Receiver, key_text: str) -> tuple:
    """Key values from their canonical text (as read from ``local_key``)."""
    wire = json.loads(key_text)
    names = receiver.primary_key
    if len(names) == 1:
        wire = [wire]
    columns = inspect(receiver.cls).primary_key
    return tuple(from_wire(column, value) for column, value in zip(columns, wire, strict=True))


def where(receiver: Receiver, key_texts: list[str]) -> Any:
    """A condition selecting the records with these keys."""
    columns = list(inspect(receiver.cls).primary_key)
    values = [parse(receiver, each) for each in key_texts]
    if len(columns) == 1:
        return columns[0].in_([v[0] for v in values])
    if len(values) == 1:
        return and_(*(column == value for column, value in zip(columns, values[0],
                                                               strict=True)))
    return or_(*(and_(*(column == value for column, value in zip(columns, each,
                                                                strict=True)))
                 for each in values))


def after(receiver: Receiver, key_text: str) -> Any:
    """Records whose key sorts after this one's (seeding resumes there)."""
    columns = list(inspect(receiver.cls).primary_key)
    values = parse(receiver, key_text)
    if len(columns) == 1:
        return columns[0] > values[0]
    return tuple_(*columns) > tuple_(*values)


def get(session: Session, receiver: Receiver, local_id: int,
        key_text: str | None) -> object | None:
    """The record a mapping row stands for."""
    if not receiver.keyed:
        return session.get(receiver.cls, local_id)
    if key_text is None:
        return None
    values = parse(receiver, key_text)
    return session.get(receiver.cls, values[0] if len(values) == 1 else values)
