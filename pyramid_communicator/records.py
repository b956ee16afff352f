"""Which models take part in sync, and how a record becomes a message body
and a message body becomes attribute values again.

``receives_from`` (in :mod:`.publishing`, which also wires autopublish)
registers a mapped class here under its wire name.
"""
from __future__ import annotations

import base64
import dataclasses
import datetime
import decimal
import functools
import json
import uuid
from typing import Any

from sqlalchemy import inspect

from .conflicts import Policy
from .versions import digest

#: ``session.info`` key set while inbound messages are applied, so that
#: autopublish never echoes a received change back to its sender.
APPLYING = 'pyramid_communicator.applying'

#: What a peer may do to a model's records (``receives_from(accept=...)``).
OPERATIONS = frozenset({'create', 'update', 'delete'})


class UnknownRecord(LookupError):
    """A message names a record no model ``receives_from``."""


@dataclasses.dataclass(frozen=True)
class Receiver:
    name: str
    cls: type
    exclude: frozenset[str]
    only: frozenset[str] | None
    autopublish: bool
    policy: Policy
    match_on: tuple[str, ...] = ()
    deletes: bool = False
    accept: frozenset[str] = frozenset({'create', 'update'})

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
        return self._references

    @functools.cached_property
    def _references(self) -> dict[str, Receiver]:
        found = {}
        for key, column in self.columns().items():
            for fk in column.foreign_keys:
                target = _receiver_of_table(fk.column.table)
                if target is not None and fk.column.primary_key:
                    found[key] = target
        return found

    def columns(self) -> dict[str, Any]:
        """Attribute key -> Column, for the attributes that may cross."""
        return self._columns

    @functools.cached_property
    def _columns(self) -> dict[str, Any]:
        # Computed once, after the mappers are configured (first use).
        mapper = inspect(self.cls)
        pk = set(self.primary_key)
        return {
            prop.key: prop.columns[0]
            for prop in mapper.column_attrs
            if prop.key not in pk and self.crosses(prop.key)
        }


_by_name: dict[str, Receiver] = {}
_by_class: dict[type, Receiver] = {}


def register(receiver: Receiver) -> None:
    previous = _by_name.get(receiver.name)
    if previous is not None and previous.cls.__qualname__ != receiver.cls.__qualname__:
        raise ValueError(f'{receiver.name!r} is already received by {previous.cls!r}')
    _by_name[receiver.name] = receiver
    _by_class[receiver.cls] = receiver


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

def to_wire(value: Any) -> Any:
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode('ascii')
    return value


_PLAIN = frozenset({str, int, float, bool, type(None)})
_compact = json.JSONEncoder(separators=(',', ':'), ensure_ascii=False).encode


def fingerprint(value: Any) -> str:
    """The digest a version keeps of an attribute's Python value; equal
    numbers compare equal whatever their scale (``1.5`` and ``1.50``)."""
    if type(value) in _PLAIN:
        return digest(value)  # its own wire value
    if isinstance(value, decimal.Decimal) and value.is_finite():
        value = value.normalize()
    return digest(to_wire(value))


def natural_key(receiver: Receiver, values: dict[str, Any]) -> str | None:
    """A digest of a record's ``match_on`` values (Python values), or None
    if the model has no natural key or a value is missing."""
    if not receiver.match_on:
        return None
    parts = [values.get(key) for key in receiver.match_on]
    if any(part is None for part in parts):
        return None
    return digest([fingerprint(part) for part in parts])


def record_values(obj: object) -> dict[str, Any]:
    """The record's crossing attributes as wire values."""
    receiver = receiver_of(obj)
    state = inspect(obj)
    values = {}
    for key in receiver.columns():
        # Read through the state, never the attribute: no lazy loads, no
        # autoflush in the middle of a flush.
        if key in state.dict:
            value = state.dict[key]
        else:
            value = getattr(obj, key) if state.has_identity else None
        values[key] = value
    return values


def encode_body(name: str, values: dict[str, Any]) -> str:
    """The JSON string the wire's ``body`` holds: ``{name: {attr: value}}``."""
    return _compact({name: {key: value if type(value) in _PLAIN else to_wire(value)
                            for key, value in values.items()}})


def local_id(obj: object) -> int | None:
    identity = inspect(obj).identity
    if identity is None or len(identity) != 1:
        return None
    return identity[0]


# -- message -> record ------------------------------------------------------

def from_wire(column: Any, value: Any) -> Any:
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


def body_name(body: str) -> str | None:
    """The record name a stored body starts with (``{"name":{...}}``),
    without decoding the body (or with only its start at hand)."""
    if not body.startswith('{"'):
        return None
    end = body.find('"', 2)
    return body[2:end] if end > 2 else None


def decode_body(body: str) -> tuple[str, dict[str, Any]]:
    """Split a body into (record name, attributes); ValueError if malformed."""
    data = json.loads(body)
    if not (isinstance(data, dict) and len(data) == 1):
        raise ValueError('body must be a JSON object with exactly one record name')
    (name, attributes), = data.items()
    if not isinstance(attributes, dict):
        raise ValueError(f'attributes of {name!r} must be a JSON object')
    return name, attributes
