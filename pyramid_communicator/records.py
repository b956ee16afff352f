"""Which models take part in sync, and how a record becomes a message body
and a message body becomes a record again.

``receives_from`` registers a mapped class under its wire name;
``publish`` writes the record's current state to the outbound queue in the
session's own transaction (the transactional outbox).
"""
from __future__ import annotations

import base64
import dataclasses
import datetime
import decimal
import json
import uuid
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from sqlalchemy import event, inspect, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, object_session
from zope.sqlalchemy import mark_changed

from .models import OutboundMessage, communicator_mappings, outbound_messages, utcnow

T = TypeVar('T', bound=type)

#: ``session.info`` key set while inbound messages are applied, so that
#: autopublish never echoes a received change back to its sender.
APPLYING = 'pyramid_communicator.applying'


class UnknownRecord(LookupError):
    """A message names a record no model ``receives_from``."""


@dataclasses.dataclass(frozen=True)
class Receiver:
    name: str
    cls: type
    exclude: frozenset[str]
    only: frozenset[str] | None
    autopublish: bool

    def crosses(self, attribute: str) -> bool:
        """May this attribute travel on the wire, in either direction?"""
        if attribute in self.exclude:
            return False
        return self.only is None or attribute in self.only

    @property
    def primary_key(self) -> list[str]:
        mapper = inspect(self.cls)
        return [mapper.get_property_by_column(c).key for c in mapper.primary_key]

    def references(self) -> dict[str, Receiver]:
        """Attribute key -> receiver of the record a foreign key points at,
        for crossing columns whose foreign key targets a synced model."""
        found = {}
        for key, column in self.columns().items():
            for fk in column.foreign_keys:
                target = _receiver_of_table(fk.column.table)
                if target is not None and fk.column.primary_key:
                    found[key] = target
        return found

    def columns(self) -> dict[str, Any]:
        """Attribute key -> Column, for the attributes that may cross."""
        mapper = inspect(self.cls)
        pk = set(self.primary_key)
        return {
            prop.key: prop.columns[0]
            for prop in mapper.column_attrs
            if prop.key not in pk and self.crosses(prop.key)
        }


_by_name: dict[str, Receiver] = {}
_by_class: dict[type, Receiver] = {}


def receives_from(name: str, *, exclude: Iterable[str] = (),
                  only: Iterable[str] | None = None,
                  autopublish: bool = False) -> Callable[[T], T]:
    """Class decorator: this mapped class receives (and sends) records named
    ``name``.

    ``exclude`` attributes never cross the wire; ``only``, when given, is
    the allow-list of attributes that may.  ``autopublish`` publishes every
    insert and update flushed through any session, except changes that
    were themselves applied from an inbound message.
    """
    def register(cls: T) -> T:
        receiver = Receiver(name, cls, frozenset(exclude),
                            None if only is None else frozenset(only),
                            autopublish)
        previous = _by_name.get(name)
        if previous is not None and previous.cls.__qualname__ != cls.__qualname__:
            raise ValueError(f'{name!r} is already received by {previous.cls!r}')
        _by_name[name] = receiver
        _by_class[cls] = receiver
        if autopublish and not event.contains(cls, 'after_insert', _autopublish):
            event.listen(cls, 'after_insert', _autopublish)
            event.listen(cls, 'after_update', _autopublish)
        return cls
    return register


def _receiver_of_table(table: Any) -> Receiver | None:
    for receiver in _by_class.values():
        if inspect(receiver.cls).local_table is table:
            return receiver
    return None


def receiver_for(name: str) -> Receiver:
    try:
        return _by_name[name]
    except KeyError:
        raise UnknownRecord(f'no model receives_from {name!r}') from None


def receiver_of(obj: object) -> Receiver:
    for cls in type(obj).__mro__:
        if cls in _by_class:
            return _by_class[cls]
    raise UnknownRecord(f'{type(obj).__name__} is not registered with receives_from')


# -- record -> message ------------------------------------------------------

def _to_wire(value: Any) -> Any:
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode('ascii')
    return value


def record_body(obj: object) -> str:
    """The JSON string the wire's ``body`` holds: ``{name: {attr: value}}``."""
    receiver = receiver_of(obj)
    state = inspect(obj)
    attributes = {}
    for key in receiver.columns():
        # Read through the state, never the attribute: no lazy loads, no
        # autoflush in the middle of a flush.
        if key in state.dict:
            value = state.dict[key]
        else:
            value = getattr(obj, key) if state.has_identity else None
        attributes[key] = _to_wire(value)
    return json.dumps({receiver.name: attributes}, separators=(',', ':'),
                      ensure_ascii=False)


def _local_id(obj: object) -> int | None:
    identity = inspect(obj).identity
    if identity is None or len(identity) != 1:
        return None
    return identity[0]


def _identity(connection: Connection, receiver: Receiver,
              local_id: int | None) -> tuple[str | None, int | None]:
    """(origin, original_id) of a local record; origin None means "here"."""
    if local_id is None:
        return None, None
    m = communicator_mappings.c
    row = connection.execute(
        select(m.origin, m.original_id)
        .where(m.name == receiver.name, m.local_id == local_id)
        .limit(1)
    ).first()
    if row is not None:
        return row.origin, row.original_id
    return None, local_id


def record_refs(connection: Connection, obj: object) -> str | None:
    """JSON of the identities the record's foreign keys point at."""
    receiver = receiver_of(obj)
    state = inspect(obj)
    refs = {}
    for key, target in receiver.references().items():
        value = state.dict.get(key)
        if value is not None:
            refs[key] = list(_identity(connection, target, value))
    return json.dumps(refs, separators=(',', ':')) if refs else None


def publish(session: Session, obj: object) -> OutboundMessage:
    """Enqueue ``obj``'s current state for the peer, in ``session``'s
    current transaction: if that transaction aborts, the message is gone
    with the change.

    A record that was never flushed is published without identity; the
    receiver then creates a new record with its own id.
    """
    receiver = receiver_of(obj)
    connection = session.connection()
    origin, original_id = _identity(connection, receiver, _local_id(obj))
    # A Core insert, not session.add: the message takes its id, and so its
    # place on the wire, now, in publishing order (also among autopublished
    # ones), without flushing anything else of the caller's.
    result = connection.execute(outbound_messages.insert().values(
        body=record_body(obj), origin=origin, original_id=original_id,
        refs=record_refs(connection, obj), created_at=utcnow()))
    mark_changed(session)
    with session.no_autoflush:
        return session.get(OutboundMessage, result.inserted_primary_key[0])


def _autopublish(mapper: Any, connection: Connection, target: object) -> None:
    session = object_session(target)
    if session is not None and session.info.get(APPLYING):
        return
    state = inspect(target)
    receiver = receiver_of(target)
    if state.has_identity and not _changed(state, receiver):
        return
    local_id = _local_id(target)
    if local_id is None and len(mapper.primary_key) == 1:
        # after_insert runs before the session assigns the identity key;
        # the new primary key is already in the instance's dict.
        local_id = mapper.primary_key_from_instance(target)[0]
    origin, original_id = _identity(connection, receiver, local_id)
    connection.execute(outbound_messages.insert().values(
        body=record_body(target), origin=origin, original_id=original_id,
        refs=record_refs(connection, target)))


def _changed(state: Any, receiver: Receiver) -> bool:
    """Did any attribute that crosses the wire change in this flush?"""
    columns = receiver.columns()
    return any(state.attrs[key].history.has_changes() for key in columns)


# -- message -> record ------------------------------------------------------

def _from_wire(column: Any, value: Any) -> Any:
    if value is None:
        return None
    try:
        python_type = column.type.python_type
    except NotImplementedError:
        return value
    if not isinstance(value, str) or python_type is str:
        if python_type is float and isinstance(value, int):
            return float(value)
        return value
    if python_type is datetime.datetime:
        parsed = datetime.datetime.fromisoformat(value)
        if parsed.tzinfo is not None and not getattr(column.type, 'timezone', False):
            parsed = parsed.astimezone(datetime.UTC).replace(tzinfo=None)
        return parsed
    if python_type is datetime.date:
        return datetime.date.fromisoformat(value[:10])
    if python_type is datetime.time:
        return datetime.time.fromisoformat(value)
    if python_type is decimal.Decimal:
        return decimal.Decimal(value)
    if python_type is uuid.UUID:
        return uuid.UUID(value)
    if python_type is bytes:
        return base64.b64decode(value)
    if python_type in (int, float):
        return python_type(value)
    return value


def decode_body(body: str) -> tuple[str, dict[str, Any]]:
    """Split a body into (record name, attributes); ValueError if malformed."""
    data = json.loads(body)
    if not (isinstance(data, dict) and len(data) == 1):
        raise ValueError('body must be a JSON object with exactly one record name')
    (name, attributes), = data.items()
    if not isinstance(attributes, dict):
        raise ValueError(f'attributes of {name!r} must be a JSON object')
    return name, attributes


def _mapped_id(connection: Connection, name: str, origin: str,
               original_id: int) -> int | None:
    """The local id mapped to (name, origin, original_id), if any."""
    m = communicator_mappings.c
    return connection.execute(
        select(m.local_id).where(m.name == name, m.origin == origin,
                                 m.original_id == original_id)).scalar()


def _resolve(session: Session, local_name: str, target: Receiver,
             origin: str, original_id: int) -> int:
    """The local id of the record (name, origin, original_id) stands for."""
    if origin == local_name:
        if session.get(target.cls, original_id) is not None:
            return original_id
    else:
        local_id = _mapped_id(session.connection(), target.name, origin, original_id)
        if local_id is not None:
            return local_id
    raise LookupError(f'refers to {target.name} {original_id} of {origin}, '
                      'which is not here (yet)')


def apply_body(session: Session, local_name: str, body: str,
               origin: str | None, original_id: int | None,
               refs: dict[str, list] | None = None) -> object:
    """Create or update the local record a message addresses.

    Known (name, origin, original_id) -> the mapped record; origin equal to
    this app's name -> the record with that primary key; otherwise a new
    record, mapped for next time.  Attributes the local table lacks are
    skipped; the primary key and excluded attributes are never assigned.
    """
    name, attributes = decode_body(body)
    receiver = receiver_for(name)
    connection = session.connection()
    obj = local_id = None
    if original_id is not None:
        if origin is None or origin == local_name:
            obj = session.get(receiver.cls, original_id)
            if obj is None:
                raise LookupError(f'{name} {original_id} of {local_name} does not exist here')
        else:
            local_id = _mapped_id(connection, name, origin, original_id)
            if local_id is not None:
                obj = session.get(receiver.cls, local_id)
    created = obj is None
    if created:
        obj = receiver.cls()
    columns = receiver.columns()
    for key, value in attributes.items():
        if key in columns:
            setattr(obj, key, _from_wire(columns[key], value))
    references = receiver.references()
    for key, (ref_origin, ref_id) in (refs or {}).items():
        if key in references:  # our peer told us whom the key means
            setattr(obj, key, _resolve(session, local_name, references[key], ref_origin, ref_id))
    if created:
        session.add(obj)
        session.flush()
        if original_id is not None and origin not in (None, local_name):
            m = communicator_mappings.c
            if local_id is None:
                statement = communicator_mappings.insert().values(
                    name=name, origin=origin, original_id=original_id)
            else:  # the mapped record was deleted here: map the new one
                statement = communicator_mappings.update().where(
                    m.name == name, m.origin == origin,
                    m.original_id == original_id)
            connection.execute(statement.values(local_id=_local_id(obj)))
    else:
        session.flush()
    return obj
